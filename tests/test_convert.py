import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_cli import REPO, error_of

from supmae.cli.main import main
from supmae.core.errors import SupmaeError
from supmae.pipelines.config import ConvertConfig, ConvertOptions
from supmae.pipelines.convert import convert, report_path
from supmae.pipelines.sources import BetonSource, open_source, sidecar_path


def pattern(width=48, height=32) -> np.ndarray:
    """An image with no symmetry, so any rotation, flip or channel swap shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + 2 * y) % 256], -1).astype(np.uint8)


def quiet_convert(src, out, **options):
    return convert(ConvertConfig(src=str(src), out=str(out), storage=ConvertOptions(**options), workers=2,
                                 progress=False))


def stock_ffcv_images(path) -> tuple[list[np.ndarray], list[int]]:
    """Every sample of `path` through an unmodified FFCV Loader, in file order."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(str(path), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = [], []
    for image, label in loader:
        images.append(np.array(image[0]))
        labels.append(int(label[0, 0]))
    return images, labels


@pytest.fixture
def awkward_folder(tmp_path):
    """One class per way a file can hold an image, plus files that hold none."""
    rgb = pattern()
    root = tmp_path / "awkward"

    def save(name, image, **kwargs):
        (root / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        image.save(root / name, **kwargs)

    save("rgb/a.png", Image.fromarray(rgb))
    save("cmyk/a.tif", Image.fromarray(rgb).convert("CMYK"))
    save("grey/a.png", Image.fromarray(rgb).convert("L"))
    save("palette/a.png", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256))
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    rgba[:, :8, 3] = 0  # a transparent band on the left; its colour channels hold junk
    rgba[:, :8, :3] = 7
    save("rgba/a.png", Image.fromarray(rgba))
    save("sixteen/a.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    save("exif/a.png", Image.fromarray(np.rot90(rgb, 1).copy()), exif=exif.tobytes())
    # files that hold no usable image
    (root / "rgb" / "notes.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "rgb" / "empty.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(pattern(200, 160)).save(jpeg, format="JPEG", quality=90)
    (root / "grey" / "truncated.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    return root


def test_awkward_images_are_stored_upright_rgb_and_bad_files_skipped(awkward_folder, tmp_path):
    out = tmp_path / "awkward.beton"
    sidecar = quiet_convert(awkward_folder, out, write_mode="raw")
    images, labels = stock_ffcv_images(out)
    classes = list(sidecar["class_to_index"])
    by_class = {classes[y]: image for image, y in zip(images, labels)}
    rgb = pattern()
    assert set(by_class) == {"rgb", "cmyk", "grey", "palette", "rgba", "sixteen", "exif"}
    assert all(image.shape == (32, 48, 3) and image.dtype == np.uint8 for image in images)
    np.testing.assert_array_equal(by_class["rgb"], rgb)
    np.testing.assert_array_equal(by_class["exif"], rgb)  # upright again
    assert np.abs(by_class["cmyk"].astype(int) - rgb).max() <= 2
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.abs(by_class["grey"].astype(int) - grey[..., None]).max() <= 1
    np.testing.assert_array_equal(by_class["sixteen"], np.repeat(rgb[..., :1], 3, -1))  # 16 bits scaled to 8
    assert np.abs(by_class["palette"].astype(int) - rgb).mean() < 6
    np.testing.assert_array_equal(by_class["rgba"][:, :8], 255)  # transparent: white, not the junk colour
    np.testing.assert_array_equal(by_class["rgba"][:, 8:], rgb[:, 8:])

    assert sidecar["num_samples"] == 7 and sidecar["skipped"] == 3
    with open(report_path(str(out))) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    assert sorted(os.path.basename(path) for path, _ in rows) == ["empty.png", "notes.jpg", "truncated.jpg"]
    assert all(reason for _, reason in rows)
    assert json.load(open(sidecar_path(str(out)))) == sidecar


@pytest.mark.parametrize("mode", ["jpg", "raw", "smart", "proportion"])
def test_labels_classes_and_pixels_survive_conversion(synth_folder, tmp_path, mode):
    out = tmp_path / f"{mode}.beton"
    sidecar = quiet_convert(synth_folder, out, write_mode=mode, max_resolution=64, smart_threshold=64 * 40 * 3)
    source, folder = BetonSource(str(out)), open_source(synth_folder)
    assert source.classes == folder.classes == list(sidecar["class_to_index"])
    np.testing.assert_array_equal(source.labels, folder.labels)
    assert sidecar["class_counts"] == {name: 12 for name in folder.classes}
    assert sidecar["options"]["write_mode"] == mode and sidecar["options"]["max_resolution"] == 64
    for i in (0, 17, 47):
        stored, original = source.image(i), folder.image(i)
        assert max(stored.size) in (63, 64)  # FFCV truncates the scaled sides
        # the same picture: compared coarsely, past resampling and JPEG differences in fine texture
        other = folder.image((i + 12) % 48)  # another class: what a mix-up would look like
        coarse = [np.asarray(image.resize((16, 12), Image.Resampling.BOX), np.float32)
                  for image in (stored, original, other)]
        assert np.abs(coarse[0] - coarse[1]).mean() < 5 < np.abs(coarse[0] - coarse[2]).mean()


def test_file_lists_and_their_label_forms(tmp_path):
    for i, _name in enumerate(["cat", "dog", "cat"]):
        Image.fromarray(pattern()).save(tmp_path / f"{i}.png")
    (tmp_path / "named.csv").write_text("path,label\n0.png,cat\n1.png,dog\n2.png,cat\n")
    (tmp_path / "numbered.tsv").write_text("0.png\t3\n1.png\t0\n2.png\t3\n")
    (tmp_path / "ragged.csv").write_text("0.png,cat\n1.png\n")
    quiet_convert(tmp_path / "named.csv", tmp_path / "named.beton")
    named = BetonSource(str(tmp_path / "named.beton"))
    assert named.classes == ["cat", "dog"] and named.labels.tolist() == [0, 1, 0]
    quiet_convert(tmp_path / "numbered.tsv", tmp_path / "numbered.beton")
    numbered = BetonSource(str(tmp_path / "numbered.beton"))
    assert numbered.classes == ["0", "1", "2", "3"] and numbered.labels.tolist() == [3, 0, 3]
    with pytest.raises(SupmaeError, match="row 2"):
        quiet_convert(tmp_path / "ragged.csv", tmp_path / "ragged.beton")


def test_file_list_labels_are_kept_or_refused_never_invented(tmp_path, caplog):
    from supmae.pipelines.sources import read_file_list
    for i in range(4):
        Image.fromarray(pattern()).save(tmp_path / f"{i}.png")

    def listed(name: str, text: str, encoding="utf-8"):
        (tmp_path / name).write_bytes(text.encode(encoding))
        return read_file_list(str(tmp_path / name))

    train = listed("train.csv", "filename,label\n0.png,2\n1.png,10\n2.png,2\n", encoding="utf-8-sig")  # BOM
    val = listed("val.csv", "path,label\n3.png,10\n")
    assert [y for _, y in train.samples] == [2, 10, 2] and [y for _, y in val.samples] == [10]  # the values kept
    assert train.classes[10] == "10" and len(train.classes) == 11
    for text, message in [("0.png,1\n1.png,-1\n", "row 2 with a negative label"),
                          ("0.png,1\n1.png,\n2.png,\n", "rows 2, 3 without a label"),
                          ("0.png,1\n1.png,cat\n", "labels mix integers (row 1) and names (row 2)"),
                          ("0.png,1\n1.png,\u00b2\n", "labels mix integers (row 1) and names (row 2)"),
                          ("0.png,1\n1.png,5000000\n", "row 2 with label 5000000, past the 1000000 classes"),
                          ("0.png,cat\n1.png,dog\n0.png,dog\n", "0.png is listed with two labels (rows 1 and 3)")]:
        with pytest.raises(SupmaeError, match=re.escape(message)):
            listed("bad.csv", text)
    repeated = listed("repeated.csv", "0.png,cat\n1.png,dog\n0.png,cat\n")
    assert [os.path.basename(str(p)) for p, _ in repeated.samples] == ["0.png", "1.png"]
    assert caplog.messages[-1].endswith("repeated.csv: 1 repeated row left out (row 3)")
    listed("sparse.csv", "0.png,0\n1.png,20000\n")
    assert "labels run up to 20000 with 2 different ones" in caplog.messages[-1]


def test_existing_output_is_kept_unless_forced(synth_folder, tmp_path, capsys):
    out = tmp_path / "data.beton"
    out.write_bytes(b"precious")
    err = error_of(capsys, "convert", synth_folder, str(out), "--no-progress")
    assert "already exists" in err and out.read_bytes() == b"precious"
    assert main(["convert", synth_folder, str(out), "--force", "--no-progress", "--max-res", "64"]) == 0
    assert len(BetonSource(str(out))) == 48


def test_bad_sources_and_options_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "does not exist" in error_of(capsys, "convert", str(tmp_path / "missing"), str(tmp_path / "o.beton"))
    assert "no class sub-folders" in error_of(capsys, "convert", str(tmp_path / "empty"), str(tmp_path / "o.beton"))
    assert "is a directory" in error_of(capsys, "convert", str(tmp_path / "empty"), str(tmp_path))
    assert "--quality" in error_of(capsys, "convert", str(tmp_path / "empty"), "o.beton", "--quality", "x")
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.jpg").write_bytes(b"no image here")
    assert "could be read" in error_of(capsys, "convert", str(tmp_path / "junk"), str(tmp_path / "o.beton"),
                                       "--no-progress")
    assert not (tmp_path / "o.beton").exists()
    (tmp_path / "junk.beton").write_bytes(os.urandom(4096))
    assert "not a readable .beton" in error_of(capsys, "pretrain", "--data", str(tmp_path / "junk.beton"),
                                               "--output", str(tmp_path / "run"))


def test_interrupted_conversion_leaves_no_output(synth_folder, tmp_path):
    """Killed while FFCV writes: OUT must not exist, nor any temporary file."""
    out = tmp_path / "out" / "data.beton"
    big = tmp_path / "big"
    for c in ("a", "b"):
        (big / c).mkdir(parents=True)
        for i in range(48):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (384, 512, 3), dtype=np.uint8)).save(
                big / c / f"{i}.png", compress_level=1)
    proc = subprocess.Popen([sys.executable, "-m", "supmae", "convert", str(big), str(out), "--workers", "1"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".data.beton.partial") for p in out.parent.glob(".*")
                                              if out.parent.exists()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob(".data.beton.partial*"))


def test_the_default_longest_side_is_320_and_0_keeps_originals(tmp_path, capsys):
    root = tmp_path / "sizes"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (500, 375), (200, 30, 30)).save(root / "a" / "large.jpg")
    Image.new("RGB", (240, 160), (30, 200, 30)).save(root / "a" / "small.jpg")
    sizes = {}
    for name, args in (("default", []), ("original", ["--max-res", "0"])):
        out = tmp_path / f"{name}.beton"
        assert main(["convert", str(root), str(out), "--no-progress", *args]) == 0
        source = BetonSource(str(out))
        sizes[name] = sorted(tuple(int(v) for v in source._image[i][["width", "height"]]) for i in range(2))
    assert sizes == {"default": [(240, 160), (320, 240)], "original": [(240, 160), (500, 375)]}
    assert "or 0 to keep originals" in error_of(capsys, "convert", str(root), str(tmp_path / "x.beton"),
                                                "--max-res", "4")


def test_a_second_conversion_to_one_output_is_refused(capsys, synth_folder, tmp_path):
    from supmae.core.lock import exclusive
    out = tmp_path / "data.beton"
    with exclusive(str(tmp_path / ".data.beton.lock"), "the first conversion's output"):
        err = error_of(capsys, "convert", synth_folder, str(out), "--no-progress")
    assert err == f"supmae: error: output {out} is in use by process {os.getpid()}: wait for it to finish, or " \
                  "choose another"
    assert not out.exists()
    assert main(["convert", synth_folder, str(out), "--no-progress"]) == 0


def test_a_cut_short_beton_or_a_stale_sidecar_is_refused_at_open(capsys, synth_folder, tmp_path):
    out = tmp_path / "data.beton"
    quiet_convert(synth_folder, out, max_resolution=64)
    from ffcv.types import ALLOC_TABLE_TYPE
    cut = tmp_path / "cut.beton"
    for missing in (5000, 7, 2 * ALLOC_TABLE_TYPE.itemsize):  # into the data, into an entry, two whole entries
        cut.write_bytes(out.read_bytes()[:-missing])
        err = error_of(capsys, "pretrain", "--data", str(cut), "--output", str(tmp_path / "run"))
        assert f"{cut} is cut short: " in err and err.endswith("; convert again"), err
    with open(sidecar_path(str(out))) as f:
        sidecar = json.load(f)
    sidecar["class_to_index"] = dict(list(sidecar["class_to_index"].items())[:2])
    with open(sidecar_path(str(out)), "w") as f:
        json.dump(sidecar, f)
    err = error_of(capsys, "pretrain", "--data", str(out), "--output", str(tmp_path / "run"))
    assert err.endswith("names 2 classes but its labels reach 3: the sidecar is stale; convert again"), err


def test_the_report_keeps_odd_names_on_one_row_and_counts_other_files(synth_folder, tmp_path, caplog):
    root = tmp_path / "odd"
    shutil.copytree(synth_folder, root, ignore=shutil.ignore_patterns("*.txt"))  # images alone, no captions
    for name in ("tab\there.jpg", "line\nbreak.jpg"):
        (root / "0000_circle_stripes" / name).write_bytes(b"not an image")
    (root / "0000_circle_stripes" / "notes.txt").write_text("a note")
    (root / "0001_triangle_stripes" / "anim.gif").write_bytes(b"GIF89a")
    out = tmp_path / "odd.beton"
    with caplog.at_level(logging.INFO, logger="supmae"):
        sidecar = quiet_convert(root, out)
    rows = (tmp_path / "odd.beton.skipped.tsv").read_text().splitlines()
    assert len(rows) == 5 and all(len(row.split("\t")) == 2 for row in rows)
    assert {row.split("\t")[0].rsplit("/", 1)[1] for row in rows[1:]} == {"tab\\there.jpg", "line\\nbreak.jpg",
                                                                         "notes.txt", "anim.gif"}
    assert (sidecar["num_samples"], sidecar["skipped"], sidecar["ignored"]) == (48, 2, 2)
    assert "48 written, 2 skipped, 2 other files ignored (listed in" in caplog.messages[-1]


def test_a_failed_forced_conversion_keeps_the_old_output_and_its_report(capsys, synth_folder, tmp_path):
    out = tmp_path / "data.beton"
    quiet_convert(synth_folder, out, max_resolution=64)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    junk = tmp_path / "junk" / "a"
    junk.mkdir(parents=True)
    (junk / "0.jpg").write_bytes(b"not an image")
    err = error_of(capsys, "convert", str(junk.parent), str(out), "--force", "--no-progress")
    assert err.endswith(f"; {out} is left as it was") and "0.jpg" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_what_a_killed_conversion_left_is_removed_by_the_next(synth_folder, tmp_path, caplog):
    from multiprocessing import resource_tracker, shared_memory
    out = tmp_path / "data.beton"
    left = tmp_path / ".data.beton.partial-999999"
    left.write_bytes(b"half a beton")
    table = shared_memory.SharedMemory(create=True, size=4096)  # FFCV's sample table, as a kill leaves it
    resource_tracker.unregister(table._name, "shared_memory")  # pyright: ignore[reportAttributeAccessIssue]  # no process of this test will free it
    table.close()
    (tmp_path / ".data.beton.table").write_text(table.name)
    with caplog.at_level(logging.INFO, logger="supmae"):
        quiet_convert(synth_folder, out, max_resolution=64)
    assert not left.exists() and f"removed {left}, left by a conversion killed while writing it" in caplog.messages
    assert f"freed shared memory {table.name}, left by a conversion killed while writing" in caplog.messages
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=table.name)
    assert not (tmp_path / ".data.beton.table").exists()


def test_a_file_that_fails_to_decode_while_written_is_skipped_and_the_beton_written_again(
        synth_folder, tmp_path, monkeypatch, caplog):
    """The first pass reads headers only, so a file truncated past its header (here: cut after that pass)
    shows only when the writer decodes it: it is skipped with its reason, and the rest written again."""
    from supmae.pipelines import convert as module
    folder = tmp_path / "data"
    shutil.copytree(synth_folder, folder)
    victim = sorted(folder.glob("*/*.jpg"))[5]
    first_pass = module._checked

    def then_truncated(*args, **kwargs):
        checked = first_pass(*args, **kwargs)
        victim.write_bytes(victim.read_bytes()[:300])
        return checked
    monkeypatch.setattr(module, "_checked", then_truncated)
    with caplog.at_level(logging.INFO, logger="supmae"):
        sidecar = quiet_convert(folder, tmp_path / "out.beton")
    assert (sidecar["num_samples"], sidecar["skipped"]) == (47, 1)
    assert any("did not decode" in m and "again without them" in m for m in caplog.messages)
    rows = (tmp_path / "out.beton.skipped.tsv").read_text().splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith(str(victim)) and "truncated" in rows[0].lower()
    assert len(open_source(str(tmp_path / "out.beton"))) == 47


def test_large_jpegs_decode_at_a_dct_scale_and_store_as_ffcv_would(tmp_path):
    """A JPEG at least twice the stored side decodes at 1/2, 1/4 or 1/8 and is shrunk the rest of the way: the
    stored size is FFCV's and the pixels are close to its full decode; anything smaller is stored exactly as
    FFCV stores it (its area resize of the full decode)."""
    import cv2

    from supmae.pipelines.convert import _stored_size
    from supmae.pipelines.decode import load_rgb
    x, y = np.meshgrid(np.linspace(0, 1, 1037), np.linspace(0, 1, 771))
    ramps = np.rint(np.stack([30 + 200 * x, 20 + 210 * y, 240 - 100 * x - 100 * y], -1)).astype(np.uint8)
    files = {"large.jpg": (ramps, {}), "rotated.jpg": (ramps, {"exif": _rotated_exif()}),
             "small.jpg": (ramps[:200, :229], {}), "picture.png": (ramps[:520, :700], {})}
    for name, (pixels, extra) in files.items():
        (tmp_path / "src" / name.split(".")[0]).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "src" / name.split(".")[0] / name, quality=95, **extra)
    out = tmp_path / "out.beton"
    quiet_convert(str(tmp_path / "src"), out, write_mode="raw", max_resolution=128)
    source = BetonSource(str(out))
    for i, name in enumerate(source.classes):
        original = np.asarray(load_rgb(str(tmp_path / "src" / name / next(n for n in files if n.startswith(name)))))
        size = _stored_size(original.shape[1], original.shape[0], 128)
        expected = cv2.resize(original, size, interpolation=cv2.INTER_AREA)
        stored = np.asarray(source.image(int(np.flatnonzero(source.labels == i)[0])))
        assert stored.shape == expected.shape, name
        if name in ("large", "rotated"):
            assert np.abs(stored.astype(int) - expected).mean() < 1.5, name
        else:
            np.testing.assert_array_equal(stored, expected, err_msg=name)


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the upright image is 771 wide
    return exif.tobytes()
