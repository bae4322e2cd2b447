"""Fast paths (Triton kernels) for the SupMAE step, installed as `supmae.kernels`.

Each kernel is a custom op (torch.library) with a fake implementation, so torch.compile traces it
without a graph break, and each has an eager twin in `supmae.objective` that the tests compare it
with. They are applied to a plain model by small functions, never woven through it.
"""
import os

import torch


def output(shape, device, dtype) -> torch.Tensor:
    """A kernel's output buffer. SUPMAE_POISON_OUTPUTS=1 fills it with NaN first, so an element a kernel
    fails to write shows up in any comparison."""
    if os.environ.get("SUPMAE_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)
