"""CLIP, FLIP and MAE-CLIP over the masked ViT trunk.

CLIP (Radford et al. 2021): the trunk's encoder as the image tower and a causal text tower (`text_tower`),
each projected to a shared embedding and trained with the symmetric InfoNCE loss at a learnable
temperature: a logit scale initialised to ln(1/0.07) and clamped at ln(100). Over several ranks the
features of the global batch are gathered with their gradients and each rank scores its own rows
(open_clip's ClipLoss). With a mask ratio above 0 it is FLIP (Li et al. 2023): the image tower sees only
the visible patches. With a decoder it is MAE-CLIP (Weers et al. 2023): a cross-modal decoder over the
image tokens (mask tokens at the removed patches) and the caption's tokens (a mask embedding at the
masked ones) predicts the removed patches' normalised pixels (the trunk's norm-pix loss, kernels
included) and the masked tokens (cross-entropy, read out through the tied token embedding):

    loss = clip_weight * InfoNCE + image_weight * pixel loss + text_weight * token loss
"""
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from supmae.models.families import CLIPOptions
from supmae.models.text_tower import TextTower
from supmae.models.trunk import REFERENCE, MaskedViT, TrunkOps
from supmae.pipelines.masking import Masking, MaskSampler, TextMaskSampler
from supmae.pipelines.split import Split
from supmae.pipelines.text import CONTEXT, special_tokens

LOGIT_SCALE_INIT, LOGIT_SCALE_MAX = math.log(1 / 0.07), math.log(100)


class ClipOutput(NamedTuple):
    loss: torch.Tensor
    clip_loss: torch.Tensor                 # InfoNCE, before its weight
    rec_loss: torch.Tensor | None        # MAE-CLIP: the removed patches' norm-pix loss, before its weight
    text_loss: torch.Tensor | None       # MAE-CLIP: the masked tokens' cross-entropy, before its weight
    image_features: torch.Tensor            # (B, E), unit length
    text_features: torch.Tensor             # (B, E), unit length
    logit_scale: torch.Tensor               # exp of the clamped parameter
    pred: torch.Tensor | None            # MAE-CLIP: the pixel predictions (as `TrunkOps.reconstruct` gives them)
    mask: torch.Tensor | None            # (B, L) 0 kept, 1 removed; None when every patch is seen

    def losses(self) -> dict[str, torch.Tensor]:
        parts = dict(loss=self.loss, clip_loss=self.clip_loss, rec_loss=self.rec_loss, text_loss=self.text_loss)
        return {name: value for name, value in parts.items() if value is not None}


# Gathers with the gradient (its backward reduce-scatters); named all_gather_tensor_autograd before torch 2.12.
_all_gather = getattr(functional_collectives, "all_gather_single_autograd", None) or \
    functional_collectives.all_gather_tensor_autograd


class _GlobalClipLoss(ClipLoss):
    """open_clip's ClipLoss as it runs on several ranks with `local_loss` and `gather_with_grad` (each rank
    scores its own rows against the global batch), the features gathered by a functional collective:
    torch.compile traces that, where it refuses the torch.distributed.nn all_gather ClipLoss calls."""

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        group = dist.group.WORLD
        assert group is not None  # built only with several ranks
        all_image, all_text = (_all_gather(f, 0, group) for f in (image_features, text_features))
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        if logit_bias is not None:
            logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
        return logits_per_image, logits_per_text


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, *,
                     gathered: bool | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows; `gathered`: over the features gathered from every rank, the global
    batch (by default when several ranks train)."""
    if gathered is None:
        gathered = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if gathered:
        loss = _GlobalClipLoss(local_loss=True, gather_with_grad=True, rank=dist.get_rank(),
                               world_size=dist.get_world_size())
    else:
        loss = ClipLoss()
    return loss(image, text, scale)


class CLIPViT(MaskedViT):
    uses_text = True

    def __init__(self, *, embed_dim: int, mlp_ratio: float, proj_dim: int, text_width: int, text_depth: int,
                 text_heads: int, text_masked_max: int, options: CLIPOptions, **trunk):
        """`trunk`: `MaskedViT`'s other arguments; `options`: the loss weights and caption masking."""
        super().__init__(embed_dim=embed_dim, mlp_ratio=mlp_ratio, **trunk)
        self.options = options
        self.image_proj = nn.Linear(embed_dim, proj_dim, bias=False)
        self.text = TextTower(width=text_width, depth=text_depth, num_heads=text_heads, mlp_ratio=mlp_ratio)
        self.text_proj = nn.Linear(text_width, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.masks_text = self.reconstructs and options.text_reconstruction
        self.text_masked_max = text_masked_max
        if self.masks_text:
            decoder_width = self.mask_token.shape[-1]
            self.text_mask_token = nn.Parameter(torch.zeros(1, 1, text_width))
            self.text_decoder_embed = nn.Linear(text_width, decoder_width)
            self.text_decoder_pos = nn.Parameter(torch.zeros(1, CONTEXT, decoder_width))
            self.text_pred = nn.Linear(decoder_width, text_width)
        self.loss_names = ("loss", "clip_loss", *(("rec_loss",) if self.reconstructs else ()),
                           *(("text_loss",) if self.masks_text else ()))
        self._init_weights()
        self.text.init_embeddings()
        if self.masks_text:
            nn.init.normal_(self.text_mask_token, std=0.02)
            nn.init.normal_(self.text_decoder_pos, std=0.02)

    def mask_samplers(self, *, seed: int, device: torch.device, rank: int = 0,
                      split: Split | None = None) -> tuple[MaskSampler | None, TextMaskSampler | None]:
        patches, _ = super().mask_samplers(seed=seed, device=device, rank=rank, split=split)
        if not self.masks_text:
            return patches, None
        return patches, TextMaskSampler(self.options.text_mask_ratio, special=special_tokens(), seed=seed,
                                        device=device, rank=rank, split=split,
                                        max_masked=self.text_masked_max)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E) unit embeddings of whole images (every patch seen), as zero-shot and retrieval read them."""
        return self._image_embedding(self.encode(self.embed(images)))

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, E) unit embeddings of (B, 77) captions."""
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def _image_embedding(self, latent: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.pooled(latent)), dim=-1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, tokens: torch.Tensor,
                text_mask: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                masking: Masking | None = None, ops: TrunkOps | None = None) -> ClipOutput:
        """Labels are not used. Without a mask ratio (CLIP) the image tower sees every patch; otherwise (FLIP,
        MAE-CLIP) only the visible ones, by `masking` (or one drawn from `noise`)."""
        ops = ops or REFERENCE
        if self.mask_ratio > 0:
            masking = self.masking_for(images, noise, masking)
            latent = self.encode(ops.embed_visible(self, images, masking.ids_keep))
        else:
            masking = None
            latent = self.encode(self.embed(images))
        image, text, scale = self._image_embedding(latent), self.text_features(tokens), self.scale()
        clip_loss = contrastive_loss(image, text, scale)
        weights = self.options
        loss, rec_loss, text_loss, pred = weights.clip_weight * clip_loss, None, None, None
        if self.reconstructs:
            assert masking is not None  # the registry refuses a decoder over an unmasked image
            text_mask = text_mask if self.masks_text else None
            caption = None if text_mask is None else self._masked_caption(tokens, text_mask)
            rec_loss, pred, caption_features = self.decode(latent, images, masking, ops, caption)
            loss = loss + weights.image_weight * rec_loss
            if text_mask is not None:
                text_loss = self._masked_token_loss(caption_features, tokens, text_mask)
                loss = loss + weights.text_weight * text_loss
        return ClipOutput(loss, clip_loss, rec_loss, text_loss, image, text, scale, pred,
                          None if masking is None else masking.mask)

    def _masked_caption(self, tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The caption as the decoder sees it: token embeddings, the mask embedding where the text mask hides
        a token, in the decoder's width, with learned positions."""
        embedded = self.text.token_embedding(tokens)
        embedded = torch.where(text_mask[..., None], self.text_mask_token.to(embedded.dtype), embedded)
        return self.text_decoder_embed(embedded) + self.text_decoder_pos

    def _masked_token_loss(self, features: torch.Tensor, tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the masked tokens, read through the token embedding: the mean over each caption's
        masked tokens, then over the captions (so ranks' losses average to the global batch's, as the pixel
        loss's do). The first `text_masked_max` of each caption's masked tokens are scored, so every shape is
        static."""
        order = (~text_mask).to(torch.int8).argsort(dim=1, stable=True)[:, :self.text_masked_max]
        scored = text_mask.gather(1, order).float()
        picked = features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        logits = self.text_pred(picked) @ self.text.token_embedding.weight.t()
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), tokens.gather(1, order).flatten(), reduction="none")
        return ((per_token.view_as(scored) * scored).sum(1) / scored.sum(1).clamp(min=1)).mean()

