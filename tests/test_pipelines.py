import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from supmae.core.errors import SupmaeError
from supmae.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, crop_and_flip, crop_resize_flip
from supmae.pipelines.loader import LoaderSpec, create_loader
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.sources import open_source, scan_image_folder
from supmae.pipelines.synthetic import class_names


def make_loader(folder, start=0, workers=0, seed=0, batch_size=8):
    return create_loader("torch", open_source(folder), LoaderSpec(
        batch_size=batch_size, img_size=32, mask_sampler=MaskSampler(16, 0.75, seed=seed, device="cpu"),
        workers=workers, seed=seed, start=start))


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_scan_finds_nested_images_and_rejects_bad_roots(tmp_path):
    for rel in ["b/x.jpg", "a/deep/er/y.PNG", "a/z.jpeg", "a/notes.txt", "a/.hidden.jpg"]:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    folder = scan_image_folder(str(tmp_path))
    assert folder.classes == ["a", "b"]
    assert [y for _, y in folder.samples] == [0, 0, 1]
    assert {os.path.relpath(str(p), tmp_path) for p, _ in folder.samples} == {"a/z.jpeg", "a/deep/er/y.PNG", "b/x.jpg"}
    with pytest.raises(SupmaeError, match="does not exist"):
        scan_image_folder(str(tmp_path / "missing"))
    with pytest.raises(SupmaeError, match="not a directory"):
        scan_image_folder(str(tmp_path / "b" / "x.jpg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SupmaeError, match="no class sub-folders"):
        scan_image_folder(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "c").mkdir(parents=True)
    with pytest.raises(SupmaeError, match="no image files"):
        scan_image_folder(str(tmp_path / "noimg"))


def test_crop_area_and_aspect_statistics():
    areas, aspects = [], []
    for index in range(4000):
        (left, top, w, h), _ = crop_and_flip(500, 375, seed=0, epoch=0, index=index, train=True)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        areas.append(w * h / (500 * 375))
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() > 0.19 and areas.max() <= 1.0
    # torchvision's RandomResizedCrop, the official pipeline's, draws the same distribution
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    reference = [RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.2, 1.0], [3 / 4, 4 / 3])
                 for _ in range(4000)]
    ref_areas = np.array([h * w / (500 * 375) for _, _, h, w in reference])
    ref_aspects = np.array([w / h for _, _, h, w in reference])
    assert abs(areas.mean() - ref_areas.mean()) < 0.015 and abs(areas.std() - ref_areas.std()) < 0.015
    assert abs(np.log(aspects).std() - np.log(ref_aspects).std()) < 0.01
    assert abs(np.median(np.log(aspects)) - np.median(np.log(ref_aspects))) < 0.03
    assert aspects.min() > 0.74 and aspects.max() < 1.35


def test_flip_rate_is_one_half():
    image = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))[..., None].repeat(3, axis=2))
    flips = 0
    for index in range(1000):
        view = crop_resize_flip(image, 16, *crop_and_flip(64, 64, seed=1, epoch=0, index=index, train=True))
        out = np.asarray(view, np.float32)[..., 0]
        flips += out[:, 0].mean() > out[:, -1].mean()  # the ramp now decreases left to right
    assert 450 < flips < 550


def test_loader_batches_are_normalised_masked_and_labelled(synth_folder):
    batch = take(make_loader(synth_folder), 1)[0]
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and set(batch.labels.tolist()) <= {0, 1, 2, 3}
    assert batch.masking.ids_keep.shape == (8, 4) and batch.masking.mask.sum().item() == 8 * 12
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    per_channel = batch.images.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= torch.tensor(lo) - 1e-4).all()
    assert (per_channel.max(1).values <= torch.tensor(hi) + 1e-4).all()


def test_loader_labels_match_folders(synth_folder):
    folder = scan_image_folder(synth_folder)
    assert folder.classes == class_names(4)
    assert all(os.path.basename(os.path.dirname(str(p))) == folder.classes[y] for p, y in folder.samples)
    labels = torch.cat([b.labels for b in take(make_loader(synth_folder), 6)])  # one epoch: 48 images
    assert sorted(labels.tolist()) == sorted(y for _, y in folder.samples)


def test_loader_is_deterministic_and_restartable(synth_folder):
    full = take(make_loader(synth_folder, workers=0), 9)  # crosses into a second epoch
    restarted = take(make_loader(synth_folder, start=5, workers=1), 4)
    for a, b in zip(full[5:], restarted):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.masking.ids_keep, b.masking.ids_keep)
    other_seed = take(make_loader(synth_folder, seed=1), 1)[0]
    assert not torch.equal(other_seed.images, full[0].images)
    # a new epoch brings a new order
    assert not torch.equal(full[0].labels, full[6].labels) or not torch.equal(full[0].images, full[6].images)


def test_unreadable_image_is_a_clear_error(folder_with_a_bad_image):
    with pytest.raises(SupmaeError, match=r"cannot read image .*b/2\.jpg"):
        take(make_loader(folder_with_a_bad_image, workers=1), 2)


def test_synthetic_classes_are_learnable(synth_folder):
    """A nearest-centroid classifier on the hues of vivid pixels beats chance (25%) by far."""
    folder = scan_image_folder(synth_folder)

    def features(path):
        hsv = np.asarray(Image.open(path).convert("HSV"), np.int64)
        vivid = hsv[(hsv[..., 1] > 140) & (hsv[..., 2] > 140)]
        hist = np.bincount(vivid[:, 0] // 16, minlength=16)
        return hist / max(hist.sum(), 1)

    x = np.stack([features(p) for p, _ in folder.samples])
    y = np.array([label for _, label in folder.samples])
    train = np.arange(len(y)) % 3 != 0
    centroids = np.stack([x[train & (y == c)].mean(0) for c in range(4)])
    predicted = np.argmin(((x[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y[~train]).mean() > 0.6


def test_synthetic_images_look_like_imagenet(synth_folder):
    sizes = [Image.open(str(p)).size for p, _ in scan_image_folder(synth_folder).samples]
    assert all(256 <= w <= 512 and 224 <= h <= 448 for w, h in sizes)
    assert len(set(sizes)) > len(sizes) // 2
    assert math.isclose(np.mean([w for w, _ in sizes]), 384, rel_tol=0.2)


def test_rank_shards_are_disjoint_equal_and_cover_the_epoch():
    from supmae.pipelines.order import Schedule
    for world in (1, 2, 3):
        shards = [Schedule(100, 4, seed=5, rank=r, world_size=world).epoch(2) for r in range(world)]
        assert len({len(s) for s in shards}) == 1 and all(len(s) % 4 == 0 for s in shards)
        seen = np.concatenate(shards)
        assert len(set(seen.tolist())) == len(seen)                       # disjoint
        assert len(seen) == world * (100 // world // 4 * 4)             # all but the remainder
    one = Schedule(100, 4, seed=5)
    assert not np.array_equal(one.epoch(0), one.epoch(1))              # a new order every epoch
    with pytest.raises(ValueError):
        Schedule(100, 4, rank=2, world_size=2)


def test_a_folder_is_walked_once_through_links_and_empty_classes_are_named(tmp_path, caplog):
    root = tmp_path / "data"
    for name in ("a", "b", "empty"):
        (root / name).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "b" / "0.png")
    (root / "a" / "again").symlink_to(root / "a")  # a loop
    (root / "a" / ".hidden").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / ".hidden" / "x.png")
    images = scan_image_folder(str(root))
    assert [(os.path.relpath(str(p), root), y) for p, y in images.samples] == [
        ("a/0.png", 0), ("a/1.png", 0), ("a/2.png", 0), ("b/0.png", 1)]
    assert images.classes == ["a", "b", "empty"]
    assert caplog.messages == [f"{root}: class folder empty holds no images; each stays a class with no samples"]
