"""Fused norm-pix masked MSE: predictions for the removed patches + the images -> the reconstruction loss.

Each program builds one removed patch's target from the image on the fly, normalised by its own mean and
unbiased variance (eps 1e-6) when norm-pix is on. It reads the patch in (c, i, j) order, a row of p
neighbouring pixels of one colour plane at a time, so the loads are wide and coalesced; the prediction
rows come in the same order (the fast path permutes the prediction layer's rows once per step, a small
weight, rather than the large prediction or the image).
It reduces the squared error to that patch's mean, and the mean over all removed patches follows.
Backward rebuilds the target and writes d(pred) directly. No target tensor is ever materialised.
The twin: `supmae.models.objective.removed_patch_loss`.
"""
# pyright: reportArgumentType=false, reportCallIssue=false
# (Triton types a launch as a call of the kernel's Python signature, whose tl.constexpr annotations no int
# matches.)
import torch
import triton
import triton.language as tl

from supmae.kernels import output


@triton.jit
def _target(images, ids, row, R, GRID_W, s_b, s_c, s_h, s_w, E,
            P: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """(target, valid, offsets) of removed patch `row` = b * R + r, in float32."""
    b = (row // R).to(tl.int64)
    patch = tl.load(ids + row)
    top, left = (patch // GRID_W) * P, (patch % GRID_W) * P
    e = tl.arange(0, BLOCK)
    valid = e < E
    c, i, j = e // (P * P), (e // P) % P, e % P
    x = tl.load(images + b * s_b + c * s_c + (top + i) * s_h + (left + j) * s_w, mask=valid, other=0.0)
    x = x.to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=0) / E
        d = tl.where(valid, x - mean, 0.0)
        var = tl.sum(d * d, axis=0) / (E - 1)
        x = d / tl.sqrt(var + 1e-6)
    return x, valid, e


@triton.jit
def _forward_kernel(pred, images, ids, losses, R, GRID_W, s_b, s_c, s_h, s_w, E,
                    P: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    target, valid, e = _target(images, ids, row, R, GRID_W, s_b, s_c, s_h, s_w, E, P, NORM, BLOCK)
    p = tl.load(pred + row.to(tl.int64) * E + e, mask=valid, other=0.0).to(tl.float32)
    diff = tl.where(valid, p - target, 0.0)
    tl.store(losses + row, tl.sum(diff * diff, axis=0) / E)


@triton.jit
def _backward_kernel(grad, pred, images, ids, dpred, R, GRID_W, s_b, s_c, s_h, s_w, E, scale,
                     P: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    target, valid, e = _target(images, ids, row, R, GRID_W, s_b, s_c, s_h, s_w, E, P, NORM, BLOCK)
    offsets = row.to(tl.int64) * E + e
    p = tl.load(pred + offsets, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(grad).to(tl.float32)
    tl.store(dpred + offsets, (g * scale * (p - target)).to(dpred.dtype.element_ty), mask=valid)


def _launch_args(pred, images, ids_removed, patch_size):
    b, r, e = pred.shape
    c = images.shape[1]
    if e != patch_size * patch_size * c:
        raise ValueError(f"pred rows of {e} do not match {c}-channel {patch_size}x{patch_size} patches")
    if e > 16384:  # one program holds a whole patch in registers
        raise ValueError(f"patches of {e} values are too large for the fused loss (at most 16384)")
    return (r, images.shape[3] // patch_size, *images.stride(), e), dict(
        P=patch_size, BLOCK=triton.next_power_of_2(e))


@torch.library.custom_op("supmae::norm_pix_mse", mutates_args=())
def norm_pix_mse_triton(pred: torch.Tensor, images: torch.Tensor, ids_removed: torch.Tensor, patch_size: int,
                        norm_pix: bool) -> torch.Tensor:
    pred, ids_removed = pred.contiguous(), ids_removed.contiguous()
    args, meta = _launch_args(pred, images, ids_removed, patch_size)
    losses = output((pred.shape[0] * pred.shape[1],), pred.device, torch.float32)
    _forward_kernel[(losses.numel(),)](pred, images, ids_removed, losses, *args, NORM=norm_pix, **meta)
    return losses.mean()


@norm_pix_mse_triton.register_fake
def _(pred, images, ids_removed, patch_size, norm_pix):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("supmae::norm_pix_mse_backward", mutates_args=())
def norm_pix_mse_backward(grad: torch.Tensor, pred: torch.Tensor, images: torch.Tensor, ids_removed: torch.Tensor,
                          patch_size: int, norm_pix: bool) -> torch.Tensor:
    pred, ids_removed = pred.contiguous(), ids_removed.contiguous()
    args, meta = _launch_args(pred, images, ids_removed, patch_size)
    dpred = output(pred.shape, pred.device, pred.dtype)
    rows, e = pred.shape[0] * pred.shape[1], pred.shape[2]
    # d/dpred of mean over rows of mean over elements of (pred - target)^2
    _backward_kernel[(rows,)](grad, pred, images, ids_removed, dpred, *args, 2.0 / (rows * e), NORM=norm_pix, **meta)
    return dpred


@norm_pix_mse_backward.register_fake
def _(grad, pred, images, ids_removed, patch_size, norm_pix):
    return pred.new_empty(pred.shape)  # contiguous, as the real op's output, whatever pred's strides


def _setup_context(ctx, inputs, output):
    pred, images, ids_removed, patch_size, norm_pix = inputs
    ctx.save_for_backward(pred, images, ids_removed)
    ctx.patch_size, ctx.norm_pix = patch_size, norm_pix


def _backward(ctx, grad):
    pred, images, ids_removed = ctx.saved_tensors
    return norm_pix_mse_backward(grad, pred, images, ids_removed, ctx.patch_size, ctx.norm_pix), None, None, None, None


norm_pix_mse_triton.register_autograd(_backward, setup_context=_setup_context)

