"""Fine-tuning's augmentations, timm's in every engine: RandAugment (`rand-m9-mstd0.5-inc1`) and random erasing.

The torch engine runs timm's own RandAugment; FFCV and DALI run the batched twin on the device. Each of its
ops is checked against PIL pixel for pixel, its draws against timm's by their distributions, and every
engine's output against the others' by the changes it makes.
"""
import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from test_cli import error_of
from timm.data.auto_augment import LEVEL_TO_ARG
from timm.data.random_erasing import RandomErasing as TimmRandomErasing

from supmae.core.errors import SupmaeError
from supmae.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
from supmae.pipelines.config import INCREASING_OPS, ORIGINAL_OPS, ConvertConfig, ConvertOptions, parse_policy
from supmae.pipelines.convert import convert
from supmae.pipelines.device_augment import RandAugment, RandomErasing, apply_op, erase_box, op_parameters
from supmae.pipelines.loader import LoaderSpec, create_loader
from supmae.pipelines.randaugment import FILL, draw, level_to_arg, seeded, timm_rand_augment
from supmae.pipelines.sources import open_source

RECIPE = "rand-m9-mstd0.5-inc1"
HPARAMS = dict(translate_const=14, img_mean=FILL, interpolation=Image.Resampling.BICUBIC)
SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
          "BrightnessIncreasing", "SharpnessIncreasing")
SIGNIFICANCE = 1e-3  # a fixed-seed test: it fails only if the distributions differ (or on a 1-in-1000 draw)


def sample_images() -> list[np.ndarray]:
    """Non-square (W and H must not be swapped anywhere): textured, flat, and two-level images."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:52]
    textured = [np.clip(np.stack([120 + 80 * np.sin(x / (5 + k)), 100 + 90 * np.cos(y / 5), 60 + 2 * x + y], -1)
                        + rng.normal(0, 20, (40, 52, 3)), 0, 255).astype(np.uint8) for k in range(3)]
    checkers = ((x + y) % 2 * 200)[..., None].repeat(3, -1).astype(np.uint8)
    return [*textured, np.full((40, 52, 3), 77, np.uint8), checkers]


@pytest.mark.parametrize("name", sorted(set(INCREASING_OPS + ORIGINAL_OPS)))
def test_each_device_op_is_pils_pixel_for_pixel(name):
    """At magnitudes 0 to 10 and both signs, each op on the device equals timm's PIL op (fill, bicubic
    resampling and all); posterize keeping no bits gives black, as under the Pillow the recipe ran with."""
    pil_op = {op.name: op.aug_fn for text in (RECIPE, "rand-m9") for op in timm_rand_augment(text, 32).ops}[name]
    images = sample_images()
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    for level in (0.0, 2.6, 5.0, 9.0, 9.7, 10.0):
        for negate in (False, True):
            arg = level_to_arg(name, np.full(len(images), level), np.full(len(images), negate))
            parameters = torch.from_numpy(op_parameters(name, arg, batch.shape[3], batch.shape[2]))
            ours = apply_op(name, batch, parameters).permute(0, 2, 3, 1).numpy()
            for image, got in zip(images, ours):
                value = int(arg[0]) if name.startswith(("Posterize", "Solarize")) else arg[0].item()
                args = (value,) if LEVEL_TO_ARG[name] is not None else ()
                expected = np.asarray(pil_op(Image.fromarray(image), *args, fillcolor=FILL,
                                             resample=Image.Resampling.BICUBIC))
                np.testing.assert_array_equal(got, expected, err_msg=f"{name} at level {level}, negate {negate}")


@pytest.mark.parametrize("name", sorted(set(INCREASING_OPS + ORIGINAL_OPS)))
def test_level_arguments_are_timms(monkeypatch, name):
    levels = np.linspace(0, 10, 101)
    for negate, uniform in ((False, 0.1), (True, 0.9)):
        monkeypatch.setattr(random, "random", lambda u=uniform: u)  # what timm's _randomly_negate draws
        timm = [LEVEL_TO_ARG[name](level, HPARAMS)[0] if LEVEL_TO_ARG[name] else 0.0 for level in levels]
        assert level_to_arg(name, levels, np.full(len(levels), negate)).tolist() == timm


def timm_draws(text: str, n: int) -> list[list[tuple[str, float]]]:
    """The (op, argument) pairs timm's transform applies to each of n images, seeded as the torch engine seeds it."""
    transform = timm_rand_augment(text, 32)
    applied = []
    for op in transform.ops:
        op.aug_fn = lambda image, *args, name=op.name, **_: applied[-1].append((name, args[0] if args else 0.0))
    for index in range(n):
        applied.append([])
        with seeded((0, 0, index)):
            transform(Image.new("RGB", (2, 2)))
    return applied


def our_draws(text: str, n: int) -> list[list[tuple[str, float]]]:
    policy = parse_policy(text)
    ops, args = draw(policy, n, np.random.default_rng(0))
    return [[(policy.ops[k], a) for k, a in zip(row_ops, row_args) if k >= 0] for row_ops, row_args in zip(ops, args)]


def same_distribution(ours, theirs) -> float:
    """The p-value that two samples share a distribution: chi-squared over the values for a discrete one,
    Kolmogorov-Smirnov for a continuous one."""
    values = sorted(set(ours) | set(theirs))
    if len(values) <= 8:
        table = [[list(sample).count(v) for v in values] for sample in (ours, theirs)]
        return 1.0 if len(values) == 1 else float(stats.chi2_contingency(table).pvalue)  # pyright: ignore[reportAttributeAccessIssue]
    return float(stats.ks_2samp(ours, theirs).pvalue)  # pyright: ignore[reportAttributeAccessIssue]


@pytest.mark.parametrize("text", [RECIPE, "rand-m7-n3-p0.8-mstd101"])
def test_the_policy_draws_as_timms_does(text):
    """How many ops an image gets, which, and at what arguments, from 6000 images each way."""
    ours, theirs = our_draws(text, 6000), timm_draws(text, 6000)
    assert same_distribution([len(d) for d in ours], [len(d) for d in theirs]) > SIGNIFICANCE
    names = sorted(INCREASING_OPS if "inc1" in text else ORIGINAL_OPS)
    counts = [[sum(op == name for d in draws for op, _ in d) for name in names] for draws in (ours, theirs)]
    assert all(counts[0]) and stats.chi2_contingency(counts).pvalue > SIGNIFICANCE  # pyright: ignore[reportAttributeAccessIssue]
    for name in names:
        args = [[a for d in draws for op, a in d if op == name] for draws in (ours, theirs)]
        assert same_distribution(*args) > SIGNIFICANCE, name
        if name in SIGNED:
            assert 0.4 < np.mean(np.array(args[0]) < (1 if "Increasing" in name else 0)) < 0.6


def test_policies_are_checked_in_timms_notation():
    policy = parse_policy(RECIPE)
    assert (policy.ops, policy.magnitude, policy.std, policy.layers, policy.prob) == (INCREASING_OPS, 9, 0.5, 2, 0.5)
    assert parse_policy("rand-m10-mstd101").std == float("inf") and parse_policy("rand-n3").ops == ORIGINAL_OPS
    for bad, message in [("augmix-m5", "not a RandAugment policy"), ("rand-m9-q2", "unknown section 'q2'"),
                         ("rand-n0", "n must be at least 1")]:
        with pytest.raises(SupmaeError, match=message):
            parse_policy(bad)


def test_a_bad_policy_is_a_one_line_error(capsys, checkpoint, synth_folder):
    err = error_of(capsys, "finetune", "--checkpoint", checkpoint, "--train", synth_folder, "--val", synth_folder,
                   "--aa", "rand-m9-x1")
    assert "unknown section 'x1'" in err


def erased_area(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """Each image's erased share: the pixels that changed."""
    return (before != after).any(1).float().mean((1, 2)).numpy()


def test_erasing_draws_timms_boxes():
    """The erased share of each image and how often one is erased, against timm's RandomErasing on 4000 images."""
    images = torch.zeros(4000, 3, 24, 40)
    random.seed(0)
    torch.manual_seed(0)
    theirs = erased_area(images, TimmRandomErasing(0.25, mode="pixel", device="cpu")(images.clone()))
    ours = erased_area(images, torch.cat([RandomErasing(0.25, seed=0)(images[i:i + 500], i // 500)
                                          for i in range(0, 4000, 500)]))
    assert same_distribution(ours > 0, theirs > 0) > SIGNIFICANCE
    assert same_distribution(ours[ours > 0], theirs[theirs > 0]) > SIGNIFICANCE
    assert 0.02 * 0.9 < ours[ours > 0].min() and ours.max() < 1 / 3 * 1.1
    noise = RandomErasing(1.0, seed=0)(images[:200], 0)
    assert abs(noise[noise != 0].std().item() - 1) < 0.05  # pixel mode: standard normal noise
    assert erase_box(24, 40, 0.0, np.random.default_rng(0)) == (0, 0, 0, 0)


ENGINES = [("torch", "folder"), ("ffcv", "beton"), ("dali", "folder")]


@pytest.fixture(scope="module")
def engine_views(synth_folder, tmp_path_factory):
    """From each engine, 12 batches of the embedded images' centre views: plain, under RandAugment, and erased."""
    beton = str(tmp_path_factory.mktemp("augment") / "synth.beton")
    convert(ConvertConfig(src=synth_folder, out=beton, storage=ConvertOptions(write_mode="raw"), workers=2,
                          progress=False))
    paths = dict(folder=synth_folder, beton=beton)
    spec = LoaderSpec(batch_size=16, img_size=32, mask_sampler=None, workers=2, seed=0, train=False)
    views = {}
    for engine, kind in ENGINES:
        for name, changes in (("plain", {}), ("augmented", dict(rand_augment=RECIPE)), ("erased", dict(erase=0.25))):
            batches = iter(create_loader(engine, open_source(paths[kind]), dataclasses.replace(spec, **changes)))
            views[engine, name] = torch.cat([next(batches).images for _ in range(12)])
    return views


def pixel_change(before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """Each image's mean absolute change in 0-255 units, to a tenth (DALI normalises unchanged images in
    another order of operations than the device does, which leaves a change of 1e-6)."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return ((after - before) * std).abs().mean((1, 2, 3)).numpy().round(1)


@pytest.mark.parametrize("engine", ["ffcv", "dali"])
def test_every_engine_changes_images_as_timms_randaugment_does(engine_views, engine):
    """The same images through the torch engine (timm's RandAugment) and through FFCV or DALI (the device
    twin): the changes each makes to its own plain views share a distribution (192 images each)."""
    timm = pixel_change(engine_views["torch", "plain"], engine_views["torch", "augmented"])
    ours = pixel_change(engine_views[engine, "plain"], engine_views[engine, "augmented"])
    assert same_distribution(ours, timm) > SIGNIFICANCE
    assert 0.6 < (ours > 0.5).mean() < 0.9  # ~25% draw no op, and a few draw one that changes little here


@pytest.mark.parametrize("engine,kind", ENGINES)
def test_every_engine_erases_as_timm_does(engine_views, engine, kind):
    area = erased_area(engine_views[engine, "plain"], engine_views[engine, "erased"])
    assert 0.25 - 0.12 < (area > 0).mean() < 0.25 + 0.12  # 192 images: 3.8 standard errors either side
    assert 0.02 * 0.9 < area[area > 0].min() and area.max() < 1 / 3 * 1.1


def test_dali_hands_over_the_same_views_for_augmenting(synth_folder, monkeypatch):
    """Under RandAugment, DALI flips uint8 pixels and the device normalises them: the views of its one-pass
    normalisation, whatever the crops and flips."""
    spec = LoaderSpec(batch_size=16, img_size=32, mask_sampler=None, workers=2, seed=0)
    plain = next(iter(create_loader("dali", open_source(synth_folder), spec))).images
    monkeypatch.setattr("supmae.pipelines.loader.RandAugment", lambda policy, seed: lambda images, index: images)
    augmented = dataclasses.replace(spec, rand_augment="rand-m9-mstd0.5-inc1")  # augmented as the identity
    handed = next(iter(create_loader("dali", open_source(synth_folder), augmented))).images
    torch.testing.assert_close(handed, plain, atol=1e-5, rtol=0)


def test_mean_fill_is_timms():
    assert FILL == tuple(round(255 * m) for m in IMAGENET_MEAN) == (124, 116, 104)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_augmentation_on_a_gpu_is_the_cpus():
    """The same draws give the same pixels on a GPU (a blend may round one level apart where the GPU fuses a
    multiply-add) and the same erased boxes."""
    images = torch.from_numpy(np.stack(sample_images() * 8)).permute(0, 3, 1, 2).contiguous()
    augment, erase = RandAugment(parse_policy(RECIPE), seed=0), RandomErasing(0.5, seed=0)
    for index in range(8):
        cpu, gpu = augment(images, index).int(), augment(images.cuda(), index).cpu().int()
        assert (cpu - gpu).abs().max() <= 1 and (cpu != gpu).float().mean() < 1e-3
        normalised = images.float()
        erased_cpu, erased_gpu = erase(normalised, index), erase(normalised.cuda(), index).cpu()
        assert torch.equal(erased_cpu != normalised, erased_gpu != normalised)
