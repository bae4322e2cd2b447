"""The SupMAE objective: norm-pix reconstruction on removed patches plus a tempered classification loss."""
import torch
import torch.nn.functional as F


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, each flattened as (p, q, c)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def norm_pix(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise each patch by its own mean and unbiased variance."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-patch mean squared error, averaged over the removed patches (mask == 1) only."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, ratio: float, temperature: float) -> torch.Tensor:
    return ratio * F.cross_entropy(logits / temperature, labels)
