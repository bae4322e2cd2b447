"""`supmae visualize`: what the model sees and what it paints back, as a PNG grid.

One row per image: the centre crop | the visible patches (the removed ones greyed) | the reconstruction
(predicted patches, with each patch's true mean and spread restored when the model predicts normalised
pixels, as MAE shows its results) | the reconstruction with the visible patches pasted back.
"""
import os

import numpy as np
import torch
from PIL import Image

from supmae.errors import SupmaeError
from supmae.evaluate import load_pretrained
from supmae.objective import patchify
from supmae.pipelines.batch import IMAGENET_MEAN, IMAGENET_STD
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.sources import open_source
from supmae.pipelines.torch_loader import ordered_views
from supmae.train import resolve_device


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """The inverse of `patchify`: (B, L, p*p*C) -> (B, C, H, W) for a square grid."""
    b, n, _ = patches.shape
    grid, p = int(round(n ** 0.5)), patch_size
    x = patches.reshape(b, grid, grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid * p, grid * p)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, seed: int = 0):
    """(original, masked, reconstruction, pasted) image batches in normalised pixel space."""
    masking = MaskSampler(model.num_patches, model.mask_ratio, seed, images.device)(images.shape[0], 0)
    pred = model(images, masking=masking).pred.float()
    target = patchify(images, model.patch_size).float()
    if model.norm_pix_loss:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    removed = masking.mask.unsqueeze(-1)
    p = model.patch_size
    return (images, unpatchify(target * (1 - removed), p), unpatchify(pred, p),
            unpatchify(target * (1 - removed) + pred * removed, p))


def to_pixels(images: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return ((images * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def visualize(checkpoint: str, data: str, out: str, count: int = 6, seed: int = 0, device: str = "auto",
              log=print) -> str:
    stem, extension = os.path.splitext(out)  # checked now: PIL would find a bad name only after the model work
    if Image.registered_extensions().get(extension.lower()) not in Image.SAVE:
        raise SupmaeError(f"--out {out}: give an image file name such as {stem}.png")
    device = resolve_device(device)
    model, cfg = load_pretrained(checkpoint, device)
    batch = next(iter(ordered_views(open_source(data), cfg.img_size, count, 0, device)))
    columns = [to_pixels(x) for x in reconstruct(model, batch.images, seed)]
    gap = 4
    rows = [np.concatenate([np.pad(c[i], ((gap, gap), (gap, gap), (0, 0)), constant_values=255) for c in columns], 1)
            for i in range(len(batch.images))]
    Image.fromarray(np.concatenate(rows, 0)).save(out)
    log(f"wrote {out}: {len(rows)} images x (original | visible | reconstruction | reconstruction + visible), "
        f"mask ratio {model.mask_ratio}")
    return out
