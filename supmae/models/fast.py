"""The fast path of a plain model: `apply_kernels(model)` returns a module that runs the same parameters
with the encoder embedding only the visible patches (gathered from pixels), the decoder unshuffled by a
kernel, the prediction layer run on the removed patches only, and the fused norm-pix loss.

The backend is Triton on CUDA and the eager twins elsewhere; SUPMAE_KERNELS=triton|eager overrides
(with TRITON_INTERPRET=1, Triton runs on CPU). The model and its checkpoints keep the official layout,
since this module holds no parameters of its own.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from supmae.models.objective import channel_major, gather_patches, removed_patch_loss
from supmae.models.trunk import MaskedViT, unshuffle
from supmae.pipelines.masking import Masking

BACKENDS = ("triton", "eager")


def kernel_backend(device: torch.device) -> str:
    on_gpu = torch.device(device).type == "cuda"
    chosen = os.environ.get("SUPMAE_KERNELS") or ("triton" if on_gpu else "eager")
    if chosen not in BACKENDS:
        raise ValueError(f"SUPMAE_KERNELS must be one of {', '.join(BACKENDS)}, got {chosen!r}")
    if chosen == "triton" and not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("SUPMAE_KERNELS=triton on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return chosen


def _ops(backend: str):
    if backend == "eager":
        return gather_patches, lambda tokens, mask_token, ids_restore, ids_keep: unshuffle(
            tokens, mask_token, ids_restore), removed_patch_loss
    from supmae.kernels.norm_pix_loss import norm_pix_mse_triton
    from supmae.kernels.patch_gather import gather_patches_triton
    from supmae.kernels.unshuffle import unshuffle_triton
    return gather_patches_triton, unshuffle_triton, norm_pix_mse_triton


class FastOps:
    """The fast path's three steps (`model.TrunkOps`): the visible patches gathered straight from the pixels
    and embedded by the patch projection as a matrix product, the unshuffle kernel, and the prediction layer
    run on the removed patches only, into the fused norm-pix loss. `Output.pred` then holds the removed
    patches' predictions, (B, R, 3*p*p) in the order of `masking.ids_removed`, each row in the (c, i, j)
    order the loss reads the image in (`objective.channel_major` of the official prediction)."""

    def __init__(self, backend: str):
        self.backend = backend
        self._gather, self._unshuffle, self._loss = _ops(backend)

    def embed_visible(self, model, images, ids_keep):
        proj = model.patch_embed.proj
        patches = self._gather(images, ids_keep, model.patch_size, _compute_dtype(images.device, proj.weight))
        return F.linear(patches, proj.weight.flatten(1), proj.bias) + model.positions(images)[0, 1:][ids_keep]

    def unshuffle(self, tokens, mask_token, masking):
        return self._unshuffle(tokens, mask_token, masking.ids_restore, masking.ids_keep)

    def reconstruct(self, model, features, images, masking):
        ids_removed = masking.ids_removed
        removed = torch.gather(features, 1, ids_removed.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        linear, p = model.decoder_pred, model.patch_size
        pred = F.linear(removed, channel_major(linear.weight, p, dim=0), channel_major(linear.bias, p))
        return self._loss(pred, images, ids_removed, p, model.norm_pix_loss), pred


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    """The dtype the matrix product with `weight` runs in: autocast's, when it is on."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype


class KernelPath(nn.Module):
    """`model` run with the fast path's steps: the model's own forward, with `FastOps`."""

    def __init__(self, model: MaskedViT, backend: str):
        super().__init__()
        self.model, self.backend, self.ops = model, backend, FastOps(backend)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, masking: Masking | None,
                **text):
        """`text`: a text model's caption tokens and text mask."""
        return self.model(images, labels, masking=masking, ops=self.ops, **text)


def apply_kernels(model: MaskedViT, backend: str | None = None) -> KernelPath:
    device = next(model.parameters()).device
    return KernelPath(model, backend or kernel_backend(device))
