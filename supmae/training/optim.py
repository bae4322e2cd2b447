"""The official optimisers and schedule: pretraining's AdamW(0.9, 0.95) with no decay on 1-D parameters and
biases, the linear probe's LARS, and the per-iteration linear warm-up then half-cycle cosine they all use."""
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


class LARS(torch.optim.Optimizer):
    """LARS as the official linear probe has it (MoCo v3's): a parameter of more than one dimension takes its
    gradient plus weight decay, scaled by trust * |p| / |update| (1 where either norm is 0); biases and
    other 1-D parameters take the plain gradient. Then SGD momentum: mu = momentum * mu + update,
    p -= lr * mu."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # pyright: ignore[reportIncompatibleMethodOverride]  (no closure form)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm,
                                        torch.ones_like(p_norm))
                    update = update.mul(trust)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
