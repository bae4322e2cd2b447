"""Fast paths (Triton kernels) for the SupMAE step, installed as `supmae.kernels`.

Each kernel is a custom op (torch.library) with a fake implementation, so torch.compile traces it
without a graph break, and each has an eager twin in `supmae.models.objective` that the tests compare it
with. They are applied to a plain model by small functions, never woven through it.
"""
import os

import torch
import triton


def output(shape, device, dtype) -> torch.Tensor:
    """A kernel's output buffer. SUPMAE_POISON_OUTPUTS=1 fills it with NaN first, so an element a kernel
    fails to write shows up in any comparison."""
    if os.environ.get("SUPMAE_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def row_grid(rows: int, width: int) -> tuple[tuple[int, int], int]:
    """The launch grid (rows, blocks per row) and block size for kernels that give each row of `width`
    elements to programs of at most 1024 lanes."""
    block = min(1024, triton.next_power_of_2(width))
    return (rows, triton.cdiv(width, block)), block
