"""SupMAE: a ViT masked autoencoder with a classification branch on the visible patches.

Parameter names and shapes follow the official SupMAE/MAE checkpoints, so their state dicts load
here strictly and ours load there. With `num_classes=0` the branch is absent and the model is MAE.
"""
from functools import partial
from typing import NamedTuple, Optional, Protocol

import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import Block, PatchEmbed

from supmae.config import POOLS
from supmae.objective import classification_loss, norm_pix, patchify, reconstruction_loss
from supmae.pipelines.masking import Masking, num_kept, random_masking
from supmae.pos_embed import sincos_2d


class Output(NamedTuple):
    loss: torch.Tensor                # rec_loss + cls_loss (rec_loss alone without labels or branch)
    rec_loss: torch.Tensor
    cls_loss: Optional[torch.Tensor]  # already scaled by cls_loss_ratio
    pred: torch.Tensor                # (B, L, p*p*3) predictions for every patch
    mask: torch.Tensor                # (B, L) 0 kept, 1 removed
    logits: Optional[torch.Tensor]    # (B, num_classes)

    def losses(self) -> dict[str, torch.Tensor]:
        """The loss and its parts, by the names the metrics log (the model's `loss_names`)."""
        parts = dict(loss=self.loss, rec_loss=self.rec_loss)
        return parts if self.cls_loss is None else dict(parts, cls_loss=self.cls_loss)


class MaskedViT(nn.Module):
    """The masked ViT trunk every objective shares: patch embedding, fixed sin-cos positions, the encoder's
    blocks and norm (timm's names, so it exports as a timm ViT), and, with `decoder_depth`, MAE's pixel
    decoder (mask token, decoder blocks, prediction layer). SupMAE, MAE, CLIP and MAE-CLIP are small heads
    over these same steps; where the fast path departs from them, `TrunkOps` says how."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, mask_ratio: float, norm_pix_loss: bool = True,
                 decoder_embed_dim: int = 512, decoder_depth: int = 0, decoder_num_heads: int = 16):
        super().__init__()
        self.norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Parameters, not buffers, to keep the official checkpoint layout; they are never trained.
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=self.norm_layer) for _ in range(depth))
        self.norm = self.norm_layer(embed_dim)

        if decoder_depth:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim, grid)[None], requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=self.norm_layer)
                for _ in range(decoder_depth))
            self.decoder_norm = self.norm_layer(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

    @property
    def num_kept(self) -> int:
        return num_kept(self.num_patches, self.mask_ratio)

    def _init_weights(self):
        """MAE's initialisation, called by each model once its heads are in place."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over flattened patches
        nn.init.normal_(self.cls_token, std=0.02)
        if hasattr(self, "mask_token"):
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def masking_for(self, images: torch.Tensor, noise: Optional[torch.Tensor], masking: Optional[Masking]) -> Masking:
        """A loader's precomputed `masking`, or one drawn from `noise` (B, L), or from fresh noise."""
        if masking is not None:
            return masking
        if noise is None:
            noise = torch.rand(images.shape[0], self.num_patches, device=images.device)
        return random_masking(noise, self.num_kept)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, D): every patch embedded, its position added."""
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def encode(self, visible: torch.Tensor) -> torch.Tensor:
        """Embedded visible patches (B, num_kept, D), position included -> encoder output with cls token."""
        return self.norm(self.blocks_forward(visible))

    def blocks_forward(self, visible: torch.Tensor) -> torch.Tensor:
        """The encoder before its final norm: (B, n, D) embedded patches -> (B, 1 + n, D), cls token first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(visible.shape[0], -1, -1)
        x = torch.cat([cls, visible], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x

    def features(self, images: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        """The frozen encoder's image features, every patch visible, pooled as timm's ViT pools: `avg`
        normalises the patch tokens' mean (timm's fc_norm), `token` takes the normalised cls token."""
        x = self.blocks_forward(self.embed(images))
        return self.norm(x[:, 1:].mean(1)) if pool == "avg" else self.norm(x)[:, 0]

    def decode(self, tokens: torch.Tensor, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1 + L, D') cls + every patch's token in patch order -> decoder features (B, L, D'), cls dropped;
        `extra` (B, T, D') tokens, positions added (MAE-CLIP's caption), are decoded with them, after them."""
        x = tokens + self.decoder_pos_embed
        if extra is not None:
            x = torch.cat([x, extra], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, 1:]

    def pooled(self, latent: torch.Tensor, pool: str) -> torch.Tensor:
        """(B, 1 + n, D) encoder output -> (B, D), pooled the way a head asks: the cls token, or the mean, the
        maximum or an attention pool (`attn_pool`, which the head adds) of the patch tokens."""
        if pool == "token":
            return latent[:, 0]
        visible = latent[:, 1:]
        if pool == "max":
            return visible.amax(dim=1)
        if pool == "map":
            return self.attn_pool(visible)
        return visible.mean(dim=1)


class MaskedAutoencoderViT(MaskedViT):
    """SupMAE (MAE with a classification branch on the visible patches) and, with `num_classes=0`, MAE."""

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
        num_classes: int = 1000,
        pool: str = "avg",
        cls_hidden_dim: int = 3072,
        cls_loss_ratio: float = 0.01,
        temperature: float = 10.0,
    ):
        _check_config(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads,
                      decoder_embed_dim=decoder_embed_dim, decoder_num_heads=decoder_num_heads,
                      mask_ratio=mask_ratio, pool=pool, num_classes=num_classes)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, mask_ratio=mask_ratio,
                         norm_pix_loss=norm_pix_loss, decoder_embed_dim=decoder_embed_dim,
                         decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads)
        self.pool = pool
        self.cls_loss_ratio = cls_loss_ratio
        self.temperature = temperature
        self.loss_names = ("loss", "rec_loss", "cls_loss") if num_classes else ("loss", "rec_loss")
        self.cls_head = None
        if num_classes:
            if pool == "map":
                self.attn_pool = AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                                     norm_layer=self.norm_layer)
            self.cls_head = nn.Sequential(
                nn.Linear(embed_dim, cls_hidden_dim),
                nn.BatchNorm1d(cls_hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(cls_hidden_dim, num_classes),
            )
        self._register_load_state_dict_pre_hook(_rename_projection_head)
        self._init_weights()

    def classify(self, latent: torch.Tensor, labels: Optional[torch.Tensor]):
        """(logits, scaled classification loss), each None where there is no branch or no labels."""
        if self.cls_head is None:
            return None, None
        logits = self.cls_head(self.pooled(latent, self.pool))
        if labels is None:
            return logits, None
        return logits, classification_loss(logits, labels, ratio=self.cls_loss_ratio, temperature=self.temperature)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                noise: Optional[torch.Tensor] = None, masking: Optional[Masking] = None,
                ops: "TrunkOps" = None) -> Output:
        """`noise` (B, L) replaces the random draw; a loader's precomputed `masking` replaces both. `ops` are
        how the three data-movement steps run: the official way by default, the fast path's (`fast.FastOps`)
        under `fast.apply_kernels`; this forward is the one both run."""
        ops = ops or REFERENCE
        masking = self.masking_for(images, noise, masking)
        latent = self.encode(ops.embed_visible(self, images, masking.ids_keep))
        x = self.decoder_embed(latent)
        features = self.decode(torch.cat([x[:, :1], ops.unshuffle(x[:, 1:], self.mask_token, masking)], dim=1))
        rec_loss, pred = ops.reconstruct(self, features, images, masking)
        logits, cls_loss = self.classify(latent, labels)
        loss = rec_loss if cls_loss is None else rec_loss + cls_loss
        return Output(loss, rec_loss, cls_loss, pred, masking.mask, logits)


class TrunkOps(Protocol):
    """The three steps of the forward where the fast path departs from the official computation, written
    down so that one forward serves both (and every objective built on the same trunk)."""

    def embed_visible(self, model: MaskedViT, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, num_kept, D): the kept patches embedded, their positions added."""

    def unshuffle(self, tokens: torch.Tensor, mask_token: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Visible tokens (B, K, D') and the mask token -> (B, L, D') in patch order."""

    def reconstruct(self, model: MaskedViT, features: torch.Tensor, images: torch.Tensor,
                    masking: Masking) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss, predictions) from the decoder's (B, L, D') features."""


class ReferenceOps:
    """The official computation: embed every patch then keep some, predict every patch, weigh the loss by
    the mask. `Output.pred` holds every patch's prediction (B, L, p*p*3)."""

    def embed_visible(self, model, images, ids_keep):
        x = model.embed(images)
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def unshuffle(self, tokens, mask_token, masking):
        return unshuffle(tokens, mask_token, masking.ids_restore)

    def reconstruct(self, model, features, images, masking):
        pred = model.decoder_pred(features)
        target = patchify(images, model.patch_size)
        if model.norm_pix_loss:
            target = norm_pix(target)
        return reconstruction_loss(pred, target, masking.mask), pred


REFERENCE = ReferenceOps()


def unshuffle(tokens: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Visible tokens (B, K, D) + the mask token -> (B, L, D) in original patch order."""
    b, k, d = tokens.shape
    x = torch.cat([tokens, mask_token.expand(b, ids_restore.shape[1] - k, -1)], dim=1)
    return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))


def _rename_projection_head(state_dict, prefix, *args):
    """The released SupMAE checkpoint calls the classification head `projection_head`."""
    old = prefix + "projection_head."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "cls_head." + key[len(old):]] = state_dict.pop(key)


def _check_config(*, img_size, patch_size, embed_dim, num_heads, decoder_embed_dim, decoder_num_heads,
                  mask_ratio, pool, num_classes):
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(patch_size > 0 and img_size > 0 and img_size % patch_size == 0,
         f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
    need(embed_dim % num_heads == 0, f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    need(decoder_embed_dim % decoder_num_heads == 0,
         f"decoder_embed_dim {decoder_embed_dim} is not divisible by decoder_num_heads {decoder_num_heads}")
    need(embed_dim % 4 == 0 and decoder_embed_dim % 4 == 0,
         "embed_dim and decoder_embed_dim must be divisible by 4 (sin-cos position embeddings)")
    num_patches = (img_size // patch_size) ** 2
    need(0 < mask_ratio < 1 and 0 < num_kept(num_patches, mask_ratio) < num_patches,
         f"mask_ratio {mask_ratio} must keep at least one and remove at least one of {num_patches} patches")
    need(pool in POOLS, f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    need(num_classes >= 0, f"num_classes must be >= 0, got {num_classes}")
