"""`supmae visualize`: what the model sees and what it paints back, as a PNG grid.

One row per image: the centre crop | the visible patches (the removed ones greyed) | the reconstruction
(predicted patches, with each patch's true mean and spread restored when the model predicts normalised
pixels, as MAE shows its results) | the reconstruction with the visible patches pasted back.
"""
import logging

import numpy as np
import torch
from PIL import Image

from supmae.core.atomic import replaced
from supmae.core.errors import SupmaeError
from supmae.evaluation.config import VisualizeConfig
from supmae.evaluation.pretrained import load_pretrained
from supmae.models.objective import patchify
from supmae.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
from supmae.pipelines.loader import ordered_batches
from supmae.pipelines.masking import MaskSampler
from supmae.pipelines.sources import open_source
from supmae.runtime.hardware import resolve_device

logger = logging.getLogger(__name__)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """The inverse of `patchify`: (B, L, p*p*C) -> (B, C, H, W) for a square grid."""
    b, n, _ = patches.shape
    grid, p = int(round(n ** 0.5)), patch_size
    x = patches.reshape(b, grid, grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid * p, grid * p)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, seed: int = 0, tokens=None):
    """(original, masked, reconstruction, pasted) image batches in normalised pixel space. A MAE-CLIP model
    also takes the images' caption `tokens`, none of them masked."""
    masking = MaskSampler(model.num_patches, model.mask_ratio, seed=seed, device=images.device)(images.shape[0], 0)
    text = {} if tokens is None else dict(tokens=tokens, text_mask=torch.zeros_like(tokens, dtype=torch.bool))
    pred = model(images, masking=masking, **text).pred.float()
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


def visualize(cfg: VisualizeConfig) -> str:
    device = resolve_device(cfg.hardware.device)
    model, trained = load_pretrained(cfg.checkpoint, device)
    if not model.reconstructs:
        raise SupmaeError(f"{trained.model} has no pixel decoder, so there is no reconstruction to show")
    source = open_source(cfg.data)
    batch = next(ordered_batches(cfg.loader, source, img_size=model.img_size,
                                 batch_size=min(cfg.images, len(source)), workers=0, device=device,
                                 text=model.uses_text))
    columns = [to_pixels(x) for x in reconstruct(model, batch.images, cfg.seed, batch.tokens)]
    gap = 4
    rows = [np.concatenate([np.pad(c[i], ((gap, gap), (gap, gap), (0, 0)), constant_values=255) for c in columns], 1)
            for i in range(len(batch.images))]
    with replaced(cfg.out) as tmp:
        Image.fromarray(np.concatenate(rows, 0)).save(tmp, format=cfg.image_format)
    logger.info(f"wrote {cfg.out}: {len(rows)} images x (original | visible | reconstruction | reconstruction + "
                f"visible), "
        f"mask ratio {model.mask_ratio}")
    return cfg.out
