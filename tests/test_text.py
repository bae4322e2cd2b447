"""Image-text data: captions from shards, file lists and sidecar files, into .beton files, through every engine."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import error_of
from webdataset.writer import TarWriter

from supmae.cli.main import main
from supmae.core.errors import SupmaeError
from supmae.pipelines.config import ConvertConfig, ConvertOptions
from supmae.pipelines.convert import convert, report_path
from supmae.pipelines.loader import LoaderSpec, create_loader, ordered_batches
from supmae.pipelines.masking import TextMaskSampler
from supmae.pipelines.sources import open_source, sidecar_path
from supmae.pipelines.split import Split
from supmae.pipelines.synthetic import MANIFEST, caption_of, class_names, write_synthetic
from supmae.pipelines.text import CONTEXT, encode, identity, special_tokens, tokenizer

LONG = " ".join(["a very long caption"] * 40)


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def quiet_convert(src, out):
    return convert(ConvertConfig(src=str(src), out=str(out), storage=ConvertOptions(max_resolution=64), workers=2,
                                 progress=False))


def report_rows(out) -> dict:
    with open(report_path(str(out)), encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t") for line in list(f)[1:])


def test_tokens_are_open_clips_with_clips_truncation():
    for caption in ["A Small RED triangle, on grey!", LONG, "café ²"]:
        np.testing.assert_array_equal(encode(caption).tokens, tokenizer()([caption])[0].numpy())
    assert encode(LONG).truncated and not encode("short").truncated
    assert encode(LONG).tokens.dtype == np.int32 and encode(LONG).tokens[-1] == special_tokens()[1]
    assert identity()["context_length"] == CONTEXT and len(identity()["vocab_sha256"]) == 64


def test_text_masks_hide_caption_tokens_only_and_are_reproducible():
    rows = [encode(c).tokens for c in ("a red circle", "two small blue squares on a grey striped background", "x")]
    tokens = torch.from_numpy(np.stack(rows * 4)).long()  # 12 rows
    sampler = TextMaskSampler(0.5, special=special_tokens(), seed=3, device="cpu")
    mask = sampler(tokens, 7)
    words = (tokens != 0) & (tokens != special_tokens()[0]) & (tokens != special_tokens()[1])
    assert not (mask & ~words).any()  # never a marker, never padding
    expected = (words.sum(1) * 0.5).round().clamp(min=1)
    assert torch.equal(mask.sum(1), expected.long())
    assert torch.equal(sampler(tokens, 7), mask) and not torch.equal(sampler(tokens, 8), mask)
    shards = [TextMaskSampler(0.5, special=special_tokens(), seed=3, device="cpu", rank=r, split=Split(6, 2))(
        tokens[r * 6:r * 6 + 6], 7) for r in range(2)]
    assert torch.equal(torch.cat(shards), mask)  # ranks draw their rows of the global batch


@pytest.fixture
def shards(tmp_path):
    """Two shards from webdataset's own TarWriter: 10 samples, each an image, a caption and a label."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(2):
        with TarWriter(str(folder / f"{k:05d}.tar")) as sink:
            for i in range(5):
                sink.write({"__key__": f"s{k}{i}", "jpg": jpeg(10 * k + i), "txt": f"caption {k} {i}",
                            "cls": str(i % 3)})
    return folder


def test_shards_convert_with_captions_and_labels(shards, tmp_path):
    out = tmp_path / "shards.beton"
    sidecar = quiet_convert(f"{shards}/{{00000..00001}}.tar", out)
    assert sidecar["num_samples"] == 10 and sidecar["tokenizer"] == identity()
    assert sidecar["captions"] == dict(count=10, truncated=0)
    source = open_source(str(out))
    assert source.captioned and source.classes == ["0", "1", "2"]
    assert [source.caption(i) for i in (0, 9)] == ["caption 0 0", "caption 1 4"]
    assert source.labels.tolist() == [0, 1, 2, 0, 1] * 2
    np.testing.assert_array_equal(source.tokens(6), encode("caption 1 1").tokens)
    for spec in (str(shards), f"{shards}/00000.tar,{shards}/00001.tar"):  # a folder of shards, a list of them
        assert len(open_source(spec)) == 10


def test_bad_image_text_input_is_one_report_line_each(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    with TarWriter(str(folder / "00000.tar")) as sink:
        sink.write({"__key__": "good", "jpg": jpeg(0), "txt": "a good one"})
        sink.write({"__key__": "long", "jpg": jpeg(1), "txt": LONG})
        sink.write({"__key__": "nocaption", "jpg": jpeg(2)})
        sink.write({"__key__": "noimage", "txt": "an orphan caption"})
        sink.write({"__key__": "latin", "jpg": jpeg(3), "txt": "caf\xe9".encode("latin-1")})
        sink.write({"__key__": "empty", "jpg": jpeg(4), "txt": "  "})
        sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8 not a jpeg", "txt": "a broken image"})
        for i in range(3):
            sink.write({"__key__": f"late{i}", "jpg": jpeg(10 + i), "txt": f"late {i}"})
    whole = (folder / "00000.tar").read_bytes()
    (folder / "00001.tar").write_bytes(whole[:len(whole) // 2])  # cut short, inside some member
    out = tmp_path / "bad.beton"
    sidecar = quiet_convert(f"{folder}/{{00000..00002}}.tar", out)
    rows = report_rows(out)
    whole_shard = f"{folder / '00000.tar'}:"
    reasons = {name[len(whole_shard):].split(".")[0]: why for name, why in rows.items() if name.startswith(whole_shard)}
    assert reasons["nocaption"] == "image without a caption" and reasons["noimage"] == "caption without an image"
    assert reasons["latin"].startswith("caption is not UTF-8") and reasons["empty"] == "empty caption"
    assert reasons["corrupt"].startswith(("UnidentifiedImageError", "OSError"))
    assert rows[str(folder / "00002.tar")] == "no such shard"
    assert rows[str(folder / "00001.tar")].startswith("cut short inside ")
    assert sidecar["captions"]["truncated"] == 2  # the long caption, in both shards
    # 5 usable in the whole shard (good, long, 3 late), and those before the cut in the other
    assert 5 + 2 <= sidecar["num_samples"] < 10
    captions = [open_source(str(out)).caption(i) for i in range(sidecar["num_samples"])]
    assert captions[:5] == ["a good one", LONG, "late 0", "late 1", "late 2"]
    with pytest.raises(SupmaeError, match="names 3 shard.s. and none of them exists"):
        quiet_convert(f"{tmp_path}/none/{{0..2}}.tar", tmp_path / "none.beton")


def test_file_lists_and_folders_with_captions(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "list.csv").write_text('caption,path,label\n"a cat, asleep",0.jpg,cat\nthe dog,1.jpg,dog\n'
                                       'a cat again,2.jpg,cat\n')
    listed = open_source(str(tmp_path / "list.csv"))
    assert listed.captioned and listed.classes == ["cat", "dog"] and listed.labels.tolist() == [0, 1, 0]
    assert listed.caption(0) == "a cat, asleep"
    (tmp_path / "texts.tsv").write_text("path\tcaption\n0.jpg\tfirst\n1.jpg\tsecond\n")
    unlabelled = open_source(str(tmp_path / "texts.tsv"))
    assert unlabelled.classes == ["unlabelled"] and unlabelled.caption(1) == "second"
    root = tmp_path / "folder"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.jpg").write_bytes(jpeg(i))
            (root / name / f"{i}.txt").write_text(f"{name} number {i}")
    (root / "b" / "orphan.txt").write_text("no image")
    os.remove(root / "b" / "1.txt")
    out = tmp_path / "folder.beton"
    sidecar = quiet_convert(root, out)
    assert sidecar["num_samples"] == 3 and sidecar["captions"]["count"] == 3
    assert set(report_rows(out).values()) == {"caption without an image", "image without a caption"}
    assert [open_source(str(out)).caption(i) for i in range(3)] == ["a number 0", "a number 1", "b number 0"]


def test_every_engine_delivers_the_same_tokens(tmp_path):
    root = write_synthetic(str(tmp_path / "synth"), num_classes=3, images_per_class=5, workers=1)
    beton = tmp_path / "synth.beton"
    quiet_convert(root, beton)
    expected = np.stack([encode(caption_of(label, index)).tokens for label in range(3) for index in range(5)])
    for engine, path in [("torch", root), ("torch", beton), ("dali", root), ("dali", beton), ("ffcv", beton)]:
        spec = LoaderSpec(batch_size=5, img_size=32, mask_sampler=None, workers=1, train=False, order="sequential",
                          text=True, text_mask_sampler=TextMaskSampler(0.75, special=special_tokens(), seed=0,
                                                                        device="cpu"))
        batches = iter(create_loader(engine, open_source(str(path)), spec))
        got = [next(batches) for _ in range(3)]
        pairs = [(b.tokens, b.text_mask) for b in got if b.tokens is not None and b.text_mask is not None]
        assert len(pairs) == len(got) and all(mask.shape == tokens.shape for tokens, mask in pairs)
        np.testing.assert_array_equal(torch.cat([tokens for tokens, _ in pairs]).numpy(), expected, err_msg=engine)
    plain = next(ordered_batches("ffcv", open_source(str(beton)), img_size=32, batch_size=5, workers=1, device="cpu"))
    assert plain.tokens is None and plain.text_mask is None  # without text asked for: batches as before


def test_tokens_of_another_tokenizer_are_refused(tmp_path):
    root = write_synthetic(str(tmp_path / "synth"), num_classes=2, images_per_class=2, workers=1)
    beton = tmp_path / "synth.beton"
    quiet_convert(root, beton)
    with open(sidecar_path(str(beton))) as f:
        sidecar = json.load(f)
    sidecar["tokenizer"]["vocab_sha256"] = "0" * 64
    with open(sidecar_path(str(beton)), "w") as f:
        json.dump(sidecar, f)
    spec = LoaderSpec(batch_size=2, img_size=32, mask_sampler=None, workers=0, text=True)
    with pytest.raises(SupmaeError, match=r"holds tokens of another tokenizer \(vocab_sha256 '0000"):
        create_loader("ffcv", open_source(str(beton)), spec)
    labelled_only = tmp_path / "plain"
    shutil.copytree(root, labelled_only, ignore=lambda folder, names: [n for n in names if n.endswith(".txt")])
    with pytest.raises(SupmaeError, match="holds no captions"):
        create_loader("torch", open_source(str(labelled_only)), spec)


def test_the_embedded_dataset_is_captioned_with_what_each_image_shows(tmp_path, capsys):
    root = tmp_path / "synth"
    assert main(["synth", str(root), "--classes", "4", "--images-per-class", "10", "--workers", "1"]) == 0
    with open(root / MANIFEST) as f:
        assert json.load(f)["captions"] is True
    shapes = {"circle": ("circle", "disc"), "triangle": ("triangle",), "square": ("square",),
              "pentagon": ("pentagon",)}
    phrasings = set()
    for label, name in enumerate(class_names(4)):
        captions = [(root / name / f"{i:06d}.txt").read_text().strip() for i in range(10)]
        assert captions == [caption_of(label, i) for i in range(10)]
        assert all(any(word in c for word in shapes[name.split("_")[1]]) for c in captions)
        assert len(set(captions)) == 10  # more than the class name: every caption differs
        phrasings |= {c.split()[1] for c in captions}
    assert len(phrasings) >= 4
    source = open_source(str(root))
    assert source.captioned and len(source) == 40


def test_shards_in_the_cli(shards, tmp_path, capsys):
    out = tmp_path / "cli.beton"
    assert main(["convert", f"{shards}/{{00000..00001}}.tar", str(out), "--no-progress"]) == 0
    assert "10 written, 10 captions (0 cut to 77 tokens)" in capsys.readouterr().out
    assert "none of them exists" in error_of(capsys, "convert", f"{tmp_path}/x/{{0..1}}.tar",
                                             str(tmp_path / "x.beton"), "--no-progress")


def write_shard(path, samples: list[dict]) -> str:
    """One webdataset shard of `samples`, written by webdataset's own TarWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def test_a_class_whose_samples_are_all_left_out_is_still_a_class(tmp_path):
    folder = tmp_path / "shards"
    write_shard(folder / "00000.tar", [{"__key__": f"s{i}", "jpg": jpeg(i), "txt": f"caption {i}", "cls": str(i % 2)}
                                       for i in range(4)]
                + [{"__key__": "last", "txt": "the only one of class 2, its image lost", "cls": "2"}])
    source = open_source(str(folder))
    assert len(source) == 4 and source.classes == ["0", "1", "2"]


def test_every_command_takes_shards_as_convert_does(shards, tmp_path, capsys):
    """A brace pattern or a comma list of shards is --data to pretrain and the evaluations too; a folder of
    shards with a logs/ folder beside them is still shards; a shard a pattern names but nobody wrote is said."""
    pattern = f"{shards}/{{00000..00002}}.tar"  # one more than there are
    run = tmp_path / "run"
    assert main(["pretrain", "--data", pattern, "--model", "clip_vit_tiny_patch16", "--img-size", "32",
                 "--batch-size", "4", "--steps", "1", "--workers", "0", "--output", str(run), "--no-progress",
                 "--no-tensorboard"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {pattern}: 1 of the 3 shards it names do not exist, first {shards / '00002.tar'}" in err
    listed = f"{shards}/00000.tar,{shards}/00001.tar"
    assert main(["eval", "retrieval", "--checkpoint", str(run / "checkpoint-00000001.pt"), "--data", listed,
                 "--workers", "0"]) == 0
    assert "retrieval over 10 pairs" in capsys.readouterr().out
    (shards / "logs").mkdir()
    (shards / "logs" / "convert.log").write_text("a log, not a class")
    assert len(open_source(str(shards))) == 10
    assert error_of(capsys, "pretrain", "--data", f"{tmp_path}/none/{{0..1}}.tar").endswith(
        "names 2 shard(s) and none of them exists")


def test_a_few_stray_text_files_do_not_make_a_folder_image_text_data(tmp_path, caplog):
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        (root / "a" / f"{i}.jpg").write_bytes(jpeg(i))
    (root / "a" / "0.txt").write_text("notes about image 0")
    source = open_source(str(root))
    assert not source.captioned and len(source) == 4
    assert "1 of 4 images have a .txt file beside them: too few to be captions" in caplog.messages[-1]
