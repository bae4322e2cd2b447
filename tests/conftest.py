import pytest
import torch

from supmae.pipelines.synthetic import write_synthetic

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
