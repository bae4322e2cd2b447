"""The masked ViT trunk every objective shares, and the three steps where the fast path departs from it.

Parameter names and shapes follow the official SupMAE/MAE checkpoints (timm's names for the encoder), so
their state dicts load here strictly, ours load there, and the encoder exports as a timm ViT.
"""
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import Block, PatchEmbed

from supmae.models.objective import norm_pix, patchify, reconstruction_loss
from supmae.models.pos_embed import on_grid, sincos_2d
from supmae.pipelines.masking import Masking, MaskSampler, TextMaskSampler, num_kept, random_masking
from supmae.pipelines.split import Split


class MaskedViT(nn.Module):
    """The masked ViT trunk every objective shares: patch embedding, fixed sin-cos positions, the encoder's
    blocks and norm (timm's names, so it exports as a timm ViT), and, with `decoder_depth`, MAE's pixel
    decoder (mask token, decoder blocks, prediction layer). SupMAE, MAE, CLIP and MAE-CLIP are small heads
    over these same steps; where the fast path departs from them, `TrunkOps` says how."""

    # What a model can do, declared by each head for the code that trains, scores and shows it.
    classifies = False   # has a classification branch trained on the labels
    uses_text = False    # trains on captions
    masks_text = False   # draws a text mask over its captions
    loss_names: tuple[str, ...]  # the loss and its parts, as its output's `losses()` names them

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, mask_ratio: float, pool: str | None, norm_pix_loss: bool,
                 decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int):
        """`pool`: how a head pools the encoder's tokens (None: no head does); `decoder_depth` 0: no pixel
        decoder. The registry checks the arguments (`registry.create_model`)."""
        super().__init__()
        self.norm_layer: Any = partial(nn.LayerNorm, eps=1e-6)  # timm types norm_layer as a class
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim, self.num_heads, self.mlp_ratio = embed_dim, num_heads, mlp_ratio
        self.mask_ratio = mask_ratio
        self.pool = pool
        self.norm_pix_loss = norm_pix_loss
        self.reconstructs = decoder_depth > 0  # has the pixel decoder

        # Any side on the patch grid up to img_size (a resolution schedule's smaller epochs), not only img_size.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.num_patches = self.patch_embed.num_patches
        self.grid = grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Parameters, not buffers, to keep the official checkpoint layout; they are never trained.
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=self.norm_layer) for _ in range(depth))
        self.norm = self.norm_layer(embed_dim)
        if self.reconstructs:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim, grid)[None], requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=self.norm_layer)
                for _ in range(decoder_depth))
            self.decoder_norm = self.norm_layer(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        if pool == "map":
            self.attn_pool = AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                                 norm_layer=self.norm_layer)

    def grid_of(self, images: torch.Tensor) -> int:
        """The side of `images`' patch grid: `grid` at img_size, fewer at a smaller side."""
        return images.shape[-1] // self.patch_size

    def positions(self, images: torch.Tensor, decoder: bool = False) -> torch.Tensor:
        """The encoder's (or the decoder's) (1, 1 + L, D) position table for `images`' grid."""
        return on_grid(self.decoder_pos_embed if decoder else self.pos_embed, self.grid, self.grid_of(images))

    def _init_weights(self):
        """MAE's initialisation, called by each model once its heads are in place."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over flattened patches
        nn.init.normal_(self.cls_token, std=0.02)
        if self.reconstructs:
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def masking_for(self, images: torch.Tensor, noise: torch.Tensor | None, masking: Masking | None) -> Masking:
        """A loader's precomputed `masking`, or one drawn from `noise` (B, L), or from fresh noise."""
        if masking is not None:
            return masking
        if noise is None:
            noise = torch.rand(images.shape[0], self.grid_of(images) ** 2, device=images.device)
        return random_masking(noise, num_kept(noise.shape[1], self.mask_ratio))

    def mask_samplers(self, *, seed: int, device: torch.device, rank: int = 0,
                      split: Split | None = None) -> tuple[MaskSampler | None, TextMaskSampler | None]:
        """(patch mask sampler, text mask sampler) for the batches this model trains on, each None where it has
        no use for one: CLIP sees every patch, and only MAE-CLIP masks captions."""
        if self.mask_ratio == 0:
            return None, None
        return MaskSampler(self.num_patches, self.mask_ratio, seed=seed, device=device, rank=rank,
                           split=split), None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, D): every patch embedded, its position added."""
        return self.patch_embed(images) + self.positions(images)[:, 1:]

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

    def decode(self, latent: torch.Tensor, images: torch.Tensor, masking: Masking, ops: "TrunkOps",
               extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pixel decoder over the encoder's output (B, 1 + K, D): mask tokens fill the removed patches, and
        `extra` (B, T, D') tokens, positions added (MAE-CLIP's caption), are decoded after them. Returns the
        reconstruction loss, the predictions (as `ops.reconstruct` gives them) and the decoder's (B, T, D')
        features of `extra`."""
        x = self.decoder_embed(latent)
        x = torch.cat([x[:, :1], ops.unshuffle(x[:, 1:], self.mask_token, masking)], dim=1)
        x = x + self.positions(images, decoder=True)
        if extra is not None:
            x = torch.cat([x, extra], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        features = self.decoder_norm(x)[:, 1:]
        patches = masking.mask.shape[1]
        rec_loss, pred = ops.reconstruct(self, features[:, :patches], images, masking)
        return rec_loss, pred, features[:, patches:]

    def pooled(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, 1 + n, D) encoder output -> (B, D), pooled as `pool` says: the cls token, or the mean, the maximum
        or the attention pool of the patch tokens."""
        pool = self.pool
        if pool == "token":
            return latent[:, 0]
        visible = latent[:, 1:]
        if pool == "max":
            return visible.amax(dim=1)
        if pool == "map":
            return self.attn_pool(visible)
        return visible.mean(dim=1)


class TrunkOps(Protocol):
    """The three steps of the forward where the fast path departs from the official computation, written
    down so that one forward serves both (and every objective built on the same trunk)."""

    def embed_visible(self, model: MaskedViT, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, num_kept, D): the kept patches embedded, their positions added."""
        ...

    def unshuffle(self, tokens: torch.Tensor, mask_token: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Visible tokens (B, K, D') and the mask token -> (B, L, D') in patch order."""
        ...

    def reconstruct(self, model: MaskedViT, features: torch.Tensor, images: torch.Tensor,
                    masking: Masking) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss, predictions) from the decoder's (B, L, D') features."""
        ...


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


