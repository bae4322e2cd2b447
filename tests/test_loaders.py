"""The three engines behind one interface, on CPU: shapes, labels, augmentation statistics, determinism.

Crops are measured, not trusted: the images are coordinate maps (red = x, green = y), so the pixels of
an output view say which box of the source it shows and whether it was flipped.
"""
import dataclasses
import io
import os
import sys

import numpy as np
import pytest
import torch
from conftest import HEIGHT, WIDTH, coordinate_image
from PIL import Image
from test_cli import error_of

from supmae.core.errors import SupmaeError
from supmae.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, crop_and_flip
from supmae.pipelines.config import ConvertConfig, ConvertOptions
from supmae.pipelines.convert import convert
from supmae.pipelines.decode import without_png_profile
from supmae.pipelines.loader import LoaderSpec, create_loader, open_batches, ordered_batches
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.sources import open_source
from supmae.training.config import PretrainConfig

SIZE, BATCH = 32, 16
ENGINES = [("torch", "folder"), ("torch", "raw"), ("ffcv", "raw"), ("ffcv", "jpg"), ("dali", "folder"), ("dali", "raw")]


def spec(**overrides) -> LoaderSpec:
    return dataclasses.replace(LoaderSpec(batch_size=BATCH, img_size=SIZE, workers=2, seed=0,
                                          mask_sampler=MaskSampler(16, 0.75, seed=0, device="cpu")), **overrides)


def take(engine, path, n, **overrides):
    batches = iter(create_loader(engine, open_source(path), spec(**overrides)))
    return [next(batches) for _ in range(n)]


def pixels(batch) -> np.ndarray:
    """Back from normalised (B, 3, H, W) to 0-255 (B, H, W, 3)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((batch.images.float() * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def boxes(views: np.ndarray):
    """(area fraction, aspect w/h, flipped) of each view, read off its coordinate pixels."""
    red, green = views[..., 0], views[..., 1]
    # Output pixel centres span (S - 1) / S of the crop, and red grows by 255 / (W - 1) per source pixel.
    dx = (red[:, :, -1].mean(1) - red[:, :, 0].mean(1)) * (WIDTH - 1) / 255 * SIZE / (SIZE - 1)
    dy = (green[:, -1, :].mean(1) - green[:, 0, :].mean(1)) * (HEIGHT - 1) / 255 * SIZE / (SIZE - 1)
    w, h = np.abs(dx), dy
    return w * h / (WIDTH * HEIGHT), w / h, dx < 0


@pytest.fixture(scope="session")
def views(coordinates):
    """20 batches (320 views) from every engine, shared by the statistics tests."""
    return {(engine, kind): take(engine, coordinates[kind], 20) for engine, kind in ENGINES}


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_batches_have_the_interface_shapes_and_dtypes(views, engine, kind):
    batch = views[engine, kind][0]
    assert batch.images.shape == (BATCH, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.labels.shape == (BATCH,) and batch.labels.dtype == torch.int64
    assert batch.masking.ids_keep.shape == (BATCH, 4) and batch.masking.ids_restore.shape == (BATCH, 16)
    assert batch.masking.mask.sum().item() == BATCH * 12


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_labels_arrive_intact(views, engine, kind):
    """Blue encodes the class, so every image must arrive with its own label, and an epoch holds each once."""
    for batch in views[engine, kind]:
        blue = pixels(batch)[..., 2].mean((1, 2))
        np.testing.assert_allclose(blue, batch.labels.numpy() * 40, atol=3)
    epoch = torch.cat([b.labels for b in views[engine, kind][:2]])  # 32 images: one epoch
    assert sorted(epoch.tolist()) == sorted(list(range(4)) * 8)


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_an_ordered_pass_reads_every_sample_once_centre_cropped(coordinates, engine, kind):
    """What evaluation reads, through each engine: index order, a partial last batch, the centre crop."""
    source = open_source(coordinates[kind])
    batches = list(ordered_batches(engine, source, img_size=SIZE, batch_size=12, workers=2, device="cpu"))
    assert [len(b.labels) for b in batches] == [12, 12, 8] and all(b.masking is None for b in batches)
    assert torch.cat([b.labels for b in batches]).tolist() == source.labels.tolist()
    area, aspect, flipped = map(np.concatenate, zip(*(boxes(pixels(b)) for b in batches)))
    centre = (0.875 * HEIGHT) ** 2 / (WIDTH * HEIGHT)  # the 224/256 crop of the short side
    np.testing.assert_allclose(area, centre, rtol=0.03)
    np.testing.assert_allclose(aspect, 1, rtol=0.03)
    assert not flipped.any()


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_crop_area_aspect_and_flip_statistics(views, engine, kind):
    area, aspect, flipped = map(np.concatenate, zip(*(boxes(pixels(b)) for b in views[engine, kind])))
    reference = np.array([crop_and_flip(WIDTH, HEIGHT, seed=7, epoch=0, index=i, train=True)[0]
                          for i in range(20000)], np.float64)
    ref_area = reference[:, 2] * reference[:, 3] / (WIDTH * HEIGHT)
    ref_aspect = reference[:, 2] / reference[:, 3]
    assert area.min() > 0.17 and area.max() < 1.03
    assert abs(area.mean() - ref_area.mean()) < 0.04 and abs(area.std() - ref_area.std()) < 0.04
    assert np.exp(np.log(aspect).min()) > 0.7 and np.exp(np.log(aspect).max()) < 1.4
    assert abs(np.log(aspect).mean() - np.log(ref_aspect).mean()) < 0.05
    assert 0.38 < flipped.mean() < 0.62


@pytest.mark.parametrize("engine,kind", [("dali", "raw"), ("ffcv", "raw"), ("ffcv", "jpg")])
def test_every_engine_draws_the_same_views(views, engine, kind):
    """All take boxes and flips from (seed, epoch, index): only their decoders and resamplers differ."""
    for a, b in zip(views["torch", "folder"], views[engine, kind]):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.masking.ids_keep, b.masking.ids_keep)
        assert np.abs(pixels(a) - pixels(b)).mean() < 2.0


def test_every_engine_follows_the_same_schedule(views):
    reference = views["torch", "folder"]
    for key, batches in views.items():
        for a, b in zip(reference, batches):
            assert torch.equal(a.labels, b.labels), key
            assert torch.equal(a.masking.mask, b.masking.mask), key


@pytest.mark.parametrize("engine,kind", [("torch", "raw"), ("dali", "raw"), ("ffcv", "raw"), ("ffcv", "jpg")])
def test_views_are_a_function_of_the_seed_and_resume_exactly(coordinates, views, engine, kind):
    full = views[engine, kind]
    again = take(engine, coordinates[kind], 3, workers=1)
    resumed = take(engine, coordinates[kind], 4, start=3)  # batch 3 is mid-epoch 1
    for a, b in zip(full, again):
        assert torch.equal(a.images, b.images)
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.masking is not None and b.masking is not None and torch.equal(a.masking.ids_keep, b.masking.ids_keep)
    other = take(engine, coordinates[kind], 1, seed=1)[0]
    assert not torch.equal(other.images, full[0].images)


def test_ffcv_silences_numbas_finalizer_errors_only_while_it_iterates(coordinates, capfd):
    """A resumed part epoch's loader is dropped mid-run; numba's harmless KeyError as its dispatchers are collected
    is not printed, and once the engine is closed the process's unraisable hook is its own again."""
    hook = sys.unraisablehook
    with open_batches(create_loader("ffcv", open_source(coordinates["raw"]), spec(start=3))) as batches:
        for _ in range(5):
            next(batches)
        assert sys.unraisablehook is not hook
    assert sys.unraisablehook is hook
    assert "Exception ignored" not in capfd.readouterr().err


def test_dali_decodes_a_beton_as_ffcv_does(coordinates, tmp_path):
    """Centre views at the stored size, so no resampling: what remains is the JPEG decoders' difference."""
    folder = tmp_path / "squares"
    for label in range(2):
        (folder / str(label)).mkdir(parents=True)
        for i in range(8):
            rng = np.random.default_rng(10 * label + i)
            noise = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
            smooth = noise.resize((64, 64), Image.Resampling.BICUBIC)
            smooth.save(folder / str(label) / f"{i}.png")
    beton = str(tmp_path / "squares.beton")
    convert(ConvertConfig(src=str(folder), out=beton, storage=ConvertOptions(write_mode="jpg", jpeg_quality=90),
                          workers=1, progress=False))
    ffcv, dali = (take(engine, beton, 1, train=False, img_size=56)[0] for engine in ("ffcv", "dali"))
    assert torch.equal(ffcv.labels, dali.labels)
    difference = np.abs(pixels(ffcv) - pixels(dali))
    # FFCV decodes with libjpeg-turbo's fast integer IDCT, DALI with the accurate one: a level or so apart
    assert difference.mean() < 1.5 and difference.max() <= 8


def test_ffcv_leaves_torch_threads_alone(coordinates):
    """FFCV sets torch's intra-op threads to its worker count; a CPU step would run on that many cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        take("ffcv", coordinates["raw"], 2, workers=1)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_ffcv_takes_the_threads_numba_allows(coordinates, caplog):
    """FFCV's workers are numba threads: asked for more than numba allows, it warns and uses what it may."""
    import numba
    most = numba.config.NUMBA_NUM_THREADS  # pyright: ignore[reportAttributeAccessIssue]  (set at import)
    assert len(take("ffcv", coordinates["raw"], 1, workers=most + 1)) == 1
    assert f"runs at most {most} threads here" in caplog.text and f"not {most + 1}" in caplog.text


def test_ffcv_needs_a_beton(coordinates):
    with pytest.raises(SupmaeError, match="reads .beton files"):
        create_loader("ffcv", open_source(coordinates["folder"]), spec())


@pytest.mark.parametrize("engine,kind", [("ffcv", "jpg"), ("dali", "jpg"), ("dali", "folder")])
def test_pretrain_runs_on_every_engine(capsys, coordinates, tmp_path, engine, kind):
    from supmae.cli.main import main
    code = main(["pretrain", "--data", coordinates[kind], "--loader", engine, "--model", "supmae_vit_tiny_patch16",
                 "--img-size", "32", "--batch-size", "8", "--steps", "3", "--workers", "2", "--log-every", "1",
                 "--output", str(tmp_path / "run"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint-00000003.pt").exists()
    assert f"({engine} loader)" in capsys.readouterr().out


def test_engine_mismatches_are_one_line_errors(capsys, coordinates, tmp_path):
    common = ["--model", "supmae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "8", "--no-progress"]
    assert "reads .beton files" in error_of(capsys, "pretrain", "--data", coordinates["folder"], "--loader", "ffcv",
                                            "--output", str(tmp_path / "a"), *common)
    assert "quasi_random" in error_of(capsys, "pretrain", "--data", coordinates["folder"], "--order", "quasi_random",
                                      "--output", str(tmp_path / "b"), *common)


def test_ffcv_quasi_random_order_with_its_process_cache(coordinates):
    """FFCV's page-aware order still visits every sample once per epoch."""
    batches = take("ffcv", coordinates["raw"], 2, order="quasi_random", os_cache=False)
    blue = np.concatenate([pixels(b)[..., 2].mean((1, 2)) for b in batches])
    np.testing.assert_allclose(blue, torch.cat([b.labels for b in batches]).numpy() * 40, atol=3)
    assert sorted(torch.cat([b.labels for b in batches]).tolist()) == sorted(list(range(4)) * 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("engine,kind", [("torch", "folder"), ("torch", "raw"), ("ffcv", "jpg"), ("dali", "jpg"),
                                         ("dali", "folder")])
def test_gpu_batches_arrive_on_the_device(request, coordinate_folder, engine, kind):
    """On a GPU: mixed decode (DALI), FFCV's copy streams, the side stream of host batches."""
    for package, needed in (("ffcv", kind != "folder"), ("nvidia.dali", engine == "dali")):
        if needed:
            pytest.importorskip(package)
    path = coordinate_folder if kind == "folder" else request.getfixturevalue("coordinates")[kind]
    device = torch.device("cuda")
    batches = take(engine, path, 3, device=device, mask_sampler=MaskSampler(16, 0.75, seed=0, device=device),
                   dtype=torch.bfloat16)
    for batch, reference in zip(batches, take("torch", coordinate_folder, 3)):
        assert batch.images.device.type == "cuda" and batch.images.dtype == torch.bfloat16
        assert batch.masking is not None and batch.masking.ids_keep.device.type == "cuda"
        assert batch.labels.device.type == "cuda" and torch.equal(batch.labels.cpu(), reference.labels)
        blue = pixels(batch._replace(images=batch.images.float().cpu()))[..., 2].mean((1, 2))
        np.testing.assert_allclose(blue, batch.labels.cpu().numpy() * 40, atol=4)


def test_auto_picks_ffcv_for_a_beton_and_torch_otherwise(coordinates, monkeypatch):
    from supmae.pipelines.loader import choose_engine
    assert choose_engine("auto", open_source(coordinates["jpg"])) == "ffcv"
    assert choose_engine("auto", open_source(coordinates["folder"])) == "torch"
    assert choose_engine("dali", open_source(coordinates["jpg"])) == "dali"
    with pytest.raises(SupmaeError, match="^--loader: 'fast' is not one of auto, torch, ffcv, dali$"):
        PretrainConfig.of(loader="fast")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # no ffcv installed
    assert choose_engine("auto", open_source(coordinates["jpg"])) == "torch"


def test_dali_spawned_workers_get_a_large_source_through_a_file(coordinate_folder, tmp_path, monkeypatch):
    """On a GPU, DALI's workers are spawned; a source too large for a pipe's buffer (here 3,000 rows) reaches
    them through a file, which is gone once they have it, and the batches are the forked workers' batches."""
    import glob
    import tempfile

    import supmae.pipelines.dali_loader as dali
    images = sorted(glob.glob(f"{coordinate_folder}/*/*.png"))
    rows = [f"{images[i % len(images)]},{os.path.basename(os.path.dirname(images[i % len(images)]))}"
            for i in range(3000)]
    listing = tmp_path / "many.csv"
    listing.write_text("path,label\n" + "\n".join(rows) + "\n")
    forked = take("dali", str(listing), 1)[0]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(dali, "_start_method", lambda on_gpu: "spawn")
    written, mkstemp = [], tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kwargs: written.append(kwargs["prefix"]) or mkstemp(**kwargs))
    spawned = take("dali", str(listing), 1)[0]
    assert written == ["supmae-dali-"]
    assert torch.equal(spawned.labels, forked.labels) and torch.equal(spawned.images, forked.images)
    assert not glob.glob(str(tmp_path / "supmae-dali-*"))


def test_dali_decodes_pngs_with_a_malformed_colour_profile_silently(coordinate_folder, tmp_path, capfd):
    """libpng, inside DALI, prints a warning per image whose embedded profile it finds malformed; the profile
    is dropped before decoding (no decoder here applies it), so the pixels are those of the same PNGs without
    one and nothing is printed."""
    profiled = tmp_path / "profiled"
    for label in range(4):
        (profiled / f"c{label}").mkdir(parents=True)
        for i in range(8):
            coordinate_image(label).save(profiled / f"c{label}" / f"{i}.png", icc_profile=b"\0" * 200)
    data = np.fromfile(profiled / "c0" / "0.png", np.uint8)
    stripped = without_png_profile(data)
    assert b"iCCP" in data.tobytes() and b"iCCP" not in stripped.tobytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stripped.tobytes()))), np.asarray(coordinate_image(0)))
    capfd.readouterr()
    batch = take("dali", str(profiled), 1)[0]
    assert "libpng" not in capfd.readouterr().err
    assert torch.equal(batch.images, take("dali", coordinate_folder, 1)[0].images)
