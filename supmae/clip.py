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
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from timm.layers import AttentionPoolLatent

from supmae.config import POOLS
from supmae.model import REFERENCE, MaskedViT, TrunkOps
from supmae.pipelines.masking import Masking, num_kept
from supmae.pipelines.text import CONTEXT
from supmae.text_tower import TextTower

LOGIT_SCALE_INIT, LOGIT_SCALE_MAX = math.log(1 / 0.07), math.log(100)


class ClipOutput(NamedTuple):
    loss: torch.Tensor
    clip_loss: torch.Tensor                 # InfoNCE, before its weight
    rec_loss: Optional[torch.Tensor]        # MAE-CLIP: the removed patches' norm-pix loss, before its weight
    text_loss: Optional[torch.Tensor]       # MAE-CLIP: the masked tokens' cross-entropy, before its weight
    image_features: torch.Tensor            # (B, E), unit length
    text_features: torch.Tensor             # (B, E), unit length
    logit_scale: torch.Tensor               # exp of the clamped parameter
    pred: Optional[torch.Tensor]            # MAE-CLIP: the pixel predictions (as `TrunkOps.reconstruct` gives them)
    mask: Optional[torch.Tensor]            # (B, L) 0 kept, 1 removed; None when every patch is seen

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
        all_image, all_text = (_all_gather(f, 0, dist.group.WORLD) for f in (image_features, text_features))
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        if logit_bias is not None:
            logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
        return logits_per_image, logits_per_text


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows, over the global batch when several ranks train."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        loss = _GlobalClipLoss(local_loss=True, gather_with_grad=True, rank=dist.get_rank(),
                               world_size=dist.get_world_size())
    else:
        loss = ClipLoss()
    return loss(image, text, scale)


class CLIPViT(MaskedViT):
    uses_text = True

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, mask_ratio: float = 0.0,
                 pool: str = "token", proj_dim: int = 256, text_width: int = 256, text_depth: int = 10,
                 text_heads: int = 4, decoder_embed_dim: int = 512, decoder_depth: int = 0,
                 decoder_num_heads: int = 16, norm_pix_loss: bool = True, text_reconstruction: bool = True,
                 clip_weight: float = 1.0, image_weight: float = 1.0, text_weight: float = 0.5,
                 text_masked_max: int = 24):
        _check(img_size=img_size, patch_size=patch_size, mask_ratio=mask_ratio, pool=pool, decoder_depth=decoder_depth)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, mask_ratio=mask_ratio,
                         norm_pix_loss=norm_pix_loss, decoder_embed_dim=decoder_embed_dim,
                         decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads)
        self.pool = pool
        self.weights = dict(clip=clip_weight, image=image_weight, text=text_weight)
        if pool == "map":
            self.attn_pool = AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                                 norm_layer=self.norm_layer)
        self.image_proj = nn.Linear(embed_dim, proj_dim, bias=False)
        self.text = TextTower(width=text_width, depth=text_depth, num_heads=text_heads, mlp_ratio=mlp_ratio)
        self.text_proj = nn.Linear(text_width, proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.decoded = decoder_depth > 0
        self.text_reconstruction = self.decoded and text_reconstruction
        self.text_masked_max = text_masked_max
        if self.text_reconstruction:
            self.text_mask_token = nn.Parameter(torch.zeros(1, 1, text_width))
            self.text_decoder_embed = nn.Linear(text_width, decoder_embed_dim)
            self.text_decoder_pos = nn.Parameter(torch.zeros(1, CONTEXT, decoder_embed_dim))
            self.text_pred = nn.Linear(decoder_embed_dim, text_width)
        self.loss_names = ("loss", "clip_loss", *(("rec_loss",) if self.decoded else ()),
                           *(("text_loss",) if self.text_reconstruction else ()))
        self._init_weights()
        self.text.init_embeddings()
        if self.text_reconstruction:
            nn.init.normal_(self.text_mask_token, std=0.02)
            nn.init.normal_(self.text_decoder_pos, std=0.02)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E) unit embeddings of whole images (every patch seen), as zero-shot and retrieval read them."""
        return self._image_embedding(self.encode(self.embed(images)))

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, E) unit embeddings of (B, 77) captions."""
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def _image_embedding(self, latent: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.pooled(latent, self.pool)), dim=-1)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *, tokens: torch.Tensor,
                text_mask: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                masking: Optional[Masking] = None, ops: Optional[TrunkOps] = None) -> ClipOutput:
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
        loss, rec_loss, text_loss, pred = self.weights["clip"] * clip_loss, None, None, None
        if self.decoded:
            x = self.decoder_embed(latent)
            x = torch.cat([x[:, :1], ops.unshuffle(x[:, 1:], self.mask_token, masking)], dim=1)
            features = self.decode(x, self._masked_caption(tokens, text_mask) if self.text_reconstruction else None)
            rec_loss, pred = ops.reconstruct(self, features[:, :self.num_patches], images, masking)
            loss = loss + self.weights["image"] * rec_loss
            if self.text_reconstruction:
                text_loss = self._masked_token_loss(features[:, self.num_patches:], tokens, text_mask)
                loss = loss + self.weights["text"] * text_loss
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


def _check(*, img_size: int, patch_size: int, mask_ratio: float, pool: str, decoder_depth: int) -> None:
    if not (patch_size > 0 and img_size > 0 and img_size % patch_size == 0):
        raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
    num_patches = (img_size // patch_size) ** 2
    if not (0 <= mask_ratio < 1 and num_kept(num_patches, mask_ratio) > 0):
        raise ValueError(f"mask_ratio {mask_ratio} must keep at least one of {num_patches} patches")
    if decoder_depth and num_kept(num_patches, mask_ratio) == num_patches:
        raise ValueError(f"MAE-CLIP reconstructs removed patches: mask_ratio {mask_ratio} removes none")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
