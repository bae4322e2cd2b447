"""The official pretraining optimiser: AdamW(0.9, 0.95), no decay on 1-D parameters and biases,
per-iteration linear warmup then half-cycle cosine."""
import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, *, fused: bool = True) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), fused=fused)


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The lr at `step`: linear from 0 over `warmup` steps to `peak`, then a half-cycle cosine to `min_lr`
    at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
