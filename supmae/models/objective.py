"""The SupMAE objective: norm-pix reconstruction on removed patches plus a tempered classification loss."""

import torch
import torch.nn.functional as F


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, each flattened as (i, j, c): row, column,
    channel, the order of the official prediction layer."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def gather_patches(images: torch.Tensor, ids: torch.Tensor, patch_size: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """The patches `ids` (B, K) of each image as (B, K, C*p*p) rows flattened as (c, i, j): the order of
    the patch-embedding convolution's weight, so a matmul with it embeds them. `dtype`: the rows' dtype
    (the images' by default)."""
    b, c, h, w = images.shape
    p = patch_size
    patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    return torch.gather(patches, 1, ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1])).to(dtype or images.dtype)


def channel_major(x: torch.Tensor, patch_size: int, dim: int = -1) -> torch.Tensor:
    """`x` with its dimension `dim` of patch values reordered from patchify's (i, j, c) to gather_patches'
    (c, i, j)."""
    dim %= x.dim()
    x = x.unflatten(dim, (patch_size, patch_size, -1))
    return x.movedim(dim + 2, dim).flatten(dim, dim + 2)


def norm_pix(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise each patch by its own mean and unbiased variance."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-patch mean squared error, averaged over the removed patches (mask == 1) only."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def removed_patch_loss(pred: torch.Tensor, images: torch.Tensor, ids_removed: torch.Tensor, patch_size: int,
                       norm_pix_loss: bool = True) -> torch.Tensor:
    """`reconstruction_loss` when the prediction covers only the removed patches `ids_removed` (B, R), each
    row in gather_patches' (c, i, j) order (`channel_major` of the prediction layer's)."""
    target = gather_patches(images, ids_removed, patch_size, torch.float32)
    if norm_pix_loss:
        target = norm_pix(target)
    return ((pred.float() - target) ** 2).mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, *, ratio: float,
                        temperature: float) -> torch.Tensor:
    return ratio * F.cross_entropy(logits / temperature, labels)
