import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter on CPU (set before they load)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from supmae.pipelines.config import ConvertConfig, ConvertOptions
from supmae.pipelines.convert import convert
from supmae.pipelines.synthetic import render, write_synthetic

# A model small enough to train in a test: 32x32 images, 8x8 patches (16 of them), two 32-wide blocks.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory):
    """A small embedded-style dataset: 4 classes x 12 JPEGs."""
    return write_synthetic(str(tmp_path_factory.mktemp("data") / "synth"), num_classes=4, images_per_class=12,
                           workers=1)


@pytest.fixture
def folder_with_a_bad_image(tmp_path):
    """2 classes x 4 JPEGs, of which b/2.jpg is not an image at all."""
    root = tmp_path / "bad-data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            render(0, i).save(root / c / f"{i}.jpg")
    (root / "b" / "2.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return str(root)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(MiB) -> a folder on a tmpfs that small, to fill a disk; skips where mounting is not allowed."""
    mounted = []

    def mount(mib: int):
        disk = tmp_path / f"disk-{len(mounted)}"
        disk.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(disk)],
                                               capture_output=True).returncode != 0:
            pytest.skip("mounting a small tmpfs needs root and a kernel that allows it here")
        mounted.append(disk)
        return disk
    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def checkpoint(tmp_path):
    """A fresh supmae_vit_tiny_patch16 at 224, saved as a run would save it."""
    from supmae.models.registry import build_model
    from supmae.training.checkpoint import save_checkpoint
    from supmae.training.config import PretrainConfig
    cfg = PretrainConfig.of(model="supmae_vit_tiny_patch16")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg, 5)
    path = str(tmp_path / "checkpoint-00000001.pt")
    save_checkpoint(dict(model=model.state_dict(), config=cfg.values(), classes=list("abcde"), step=1), path)
    return path


# Coordinate maps (red = x, green = y): the pixels of a view say which box of the source it shows.
WIDTH, HEIGHT = 240, 160


def coordinate_image(label: int) -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return Image.fromarray(np.stack([np.rint(x * 255 / (WIDTH - 1)), np.rint(y * 255 / (HEIGHT - 1)),
                                     np.full_like(x, 40 * label)], -1).astype(np.uint8))


@pytest.fixture(scope="session")
def coordinate_folder(tmp_path_factory):
    """4 classes x 8 coordinate images as PNGs."""
    root = tmp_path_factory.mktemp("coordinates")
    for label in range(4):
        (root / "folder" / f"c{label}").mkdir(parents=True)
        for i in range(8):
            coordinate_image(label).save(root / "folder" / f"c{label}" / f"{i}.png")
    return str(root / "folder")


@pytest.fixture(scope="session")
def coordinates(coordinate_folder):
    """The same images as a PNG folder, a raw .beton and a JPEG .beton."""
    paths = {"folder": coordinate_folder}
    for mode in ("raw", "jpg"):
        paths[mode] = f"{coordinate_folder}-{mode}.beton"
        convert(ConvertConfig(src=coordinate_folder, out=paths[mode], storage=ConvertOptions(write_mode=mode),
                              workers=2, progress=False))
    return paths
