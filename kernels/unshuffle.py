"""Decoder unshuffle: visible tokens (B, K, D) + the mask token (D,) -> (B, L, D) in original patch order.

Position l takes visible token ids_restore[l] when that is below K, else the mask token. Backward
gathers each visible token's gradient from the one position it went to (ids_keep), so no atomics are
needed, and sums the mask token's over the removed positions. The twin: `supmae.models.trunk.unshuffle`.
"""
# pyright: reportArgumentType=false, reportCallIssue=false
# (Triton types a launch as a call of the kernel's Python signature, whose tl.constexpr annotations no int
# matches.)
import torch
import triton
import triton.language as tl

from supmae.kernels import output, row_grid


@triton.jit
def _unshuffle_kernel(tokens, mask_token, ids_restore, out, K, L, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # b * L + l
    b = (row // L).to(tl.int64)
    source = tl.load(ids_restore + row)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = d < D
    visible = (tl.zeros([BLOCK], dtype=tl.int64) + source) < K  # as a block: masks are per element
    x = tl.load(tokens + (b * K + source) * D + d, mask=valid & visible, other=0.0)
    m = tl.load(mask_token + d, mask=valid & ~visible, other=0.0)
    kind = out.dtype.element_ty
    tl.store(out + row.to(tl.int64) * D + d, tl.where(visible, x.to(kind), m.to(kind)), mask=valid)


@triton.jit
def _gather_rows_kernel(grad, ids_keep, dtokens, K, D, g_b, g_l, g_d, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # b * K + k
    b = (row // K).to(tl.int64)
    position = tl.load(ids_keep + row)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = d < D
    # Strided: the gradient inductor hands back need not be contiguous, and a copy would move all L rows.
    g = tl.load(grad + b * g_b + position * g_l + d * g_d, mask=valid)
    tl.store(dtokens + row.to(tl.int64) * D + d, g.to(dtokens.dtype.element_ty), mask=valid)


@torch.library.custom_op("supmae::unshuffle", mutates_args=())
def unshuffle_triton(tokens: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                     ids_keep: torch.Tensor) -> torch.Tensor:
    b, k, d = tokens.shape
    l = ids_restore.shape[1]
    out = output((b, l, d), tokens.device, _result_dtype(tokens, mask_token))
    grid, block = row_grid(b * l, d)
    _unshuffle_kernel[grid](tokens.contiguous(), mask_token.reshape(-1).contiguous(), ids_restore.contiguous(), out,
                            k, l, d, BLOCK=block)
    return out


def _result_dtype(tokens, mask_token) -> torch.dtype:
    # torch.cat's promotion, as in the twin: under bf16 autocast the fp32 mask token is not rounded.
    return torch.promote_types(tokens.dtype, mask_token.dtype)


@unshuffle_triton.register_fake
def _(tokens, mask_token, ids_restore, ids_keep):
    return tokens.new_empty(tokens.shape[0], ids_restore.shape[1], tokens.shape[2],
                            dtype=_result_dtype(tokens, mask_token))


@torch.library.custom_op("supmae::unshuffle_backward", mutates_args=())
def unshuffle_backward(grad: torch.Tensor, ids_keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, l, d = grad.shape
    k = ids_keep.shape[1]
    dtokens = output((b, k, d), grad.device, dtype)
    grid, block = row_grid(b * k, d)
    _gather_rows_kernel[grid](grad, ids_keep.contiguous(), dtokens, k, d, *grad.stride(), BLOCK=block)
    return dtokens


@unshuffle_backward.register_fake
def _(grad, ids_keep, dtype):
    return grad.new_empty(grad.shape[0], ids_keep.shape[1], grad.shape[2], dtype=dtype)


def _setup_context(ctx, inputs, output):
    tokens, mask_token, ids_restore, ids_keep = inputs
    ctx.save_for_backward(ids_restore, ids_keep)
    ctx.mask_shape, ctx.mask_dtype, ctx.k, ctx.dtype = mask_token.shape, mask_token.dtype, tokens.shape[1], tokens.dtype


def _backward(ctx, grad):
    ids_restore, ids_keep = ctx.saved_tensors
    removed = (ids_restore >= ctx.k).unsqueeze(-1).to(grad.dtype)
    dmask = (grad * removed).sum((0, 1), dtype=torch.float32).to(ctx.mask_dtype).reshape(ctx.mask_shape)
    return unshuffle_backward(grad, ids_keep, ctx.dtype), dmask, None, None


unshuffle_triton.register_autograd(_backward, setup_context=_setup_context)
