"""Visible-patch gather from pixels: images (B, C, H, W) + ids_keep (B, K) -> (B, K, C*p*p).

Each kept patch is copied straight out of the image into the (c, i, j) order of the patch-embedding
convolution's flattened weight (the twin: `supmae.models.objective.gather_patches`), so the embedding runs as
one matmul over the visible quarter and no (B, L, D) embedding of all patches is ever made. The rows are
written in the step's compute dtype, so no cast pass follows. Images carry no gradient, so there is no
backward.
"""
# pyright: reportArgumentType=false, reportCallIssue=false
# (Triton types a launch as a call of the kernel's Python signature, whose tl.constexpr annotations no int
# matches.)

import torch
import triton
import triton.language as tl

from supmae.kernels import output, row_grid


@triton.jit
def _gather_kernel(images, ids_keep, out, K, E, GRID_W, s_b, s_c, s_h, s_w,
                   P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # b * K + k
    b = (row // K).to(tl.int64)
    patch = tl.load(ids_keep + row)
    top, left = (patch // GRID_W) * P, (patch % GRID_W) * P
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = e < E
    c, i, j = e // (P * P), (e // P) % P, e % P
    pixels = tl.load(images + b * s_b + c * s_c + (top + i) * s_h + (left + j) * s_w, mask=valid)
    tl.store(out + row.to(tl.int64) * E + e, pixels.to(out.dtype.element_ty), mask=valid)


@torch.library.custom_op("supmae::gather_patches", mutates_args=())
def gather_patches_triton(images: torch.Tensor, ids_keep: torch.Tensor, patch_size: int,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    b, c, h, w = images.shape
    k, e = ids_keep.shape[1], c * patch_size * patch_size
    out = output((b, k, e), images.device, dtype or images.dtype)
    grid, block = row_grid(b * k, e)
    _gather_kernel[grid](images, ids_keep.contiguous(), out, k, e, w // patch_size, *images.stride(),
                         P=patch_size, BLOCK=block)
    return out


@gather_patches_triton.register_fake
def _(images, ids_keep, patch_size, dtype=None):
    b, c = images.shape[:2]
    return images.new_empty(b, ids_keep.shape[1], c * patch_size * patch_size, dtype=dtype or images.dtype)

