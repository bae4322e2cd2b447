"""SupMAE: a ViT masked autoencoder with a classification branch on the visible patches; with
`num_classes=0` the branch is absent and the model is MAE."""
from typing import NamedTuple

import torch
import torch.nn as nn

from supmae.models.families import SupMAEOptions
from supmae.models.objective import classification_loss
from supmae.models.trunk import REFERENCE, MaskedViT, TrunkOps
from supmae.pipelines.masking import Masking


class Output(NamedTuple):
    loss: torch.Tensor                # rec_loss + cls_loss (rec_loss alone without labels or branch)
    rec_loss: torch.Tensor
    cls_loss: torch.Tensor | None  # already scaled by cls_loss_ratio
    pred: torch.Tensor                # (B, L, p*p*3) predictions for every patch
    mask: torch.Tensor                # (B, L) 0 kept, 1 removed
    logits: torch.Tensor | None    # (B, num_classes)

    def losses(self) -> dict[str, torch.Tensor]:
        """The loss and its parts, by the names the metrics log (the model's `loss_names`)."""
        parts = dict(loss=self.loss, rec_loss=self.rec_loss)
        return parts if self.cls_loss is None else dict(parts, cls_loss=self.cls_loss)


class MaskedAutoencoderViT(MaskedViT):
    """SupMAE (MAE with a classification branch on the visible patches) and, with `num_classes=0`, MAE."""

    def __init__(self, *, embed_dim: int, pool: str | None, num_classes: int, cls_hidden_dim: int = 3072,
                 options: SupMAEOptions, **trunk):
        """`trunk`: `MaskedViT`'s other arguments; `options`: the branch's loss weight and temperature."""
        super().__init__(embed_dim=embed_dim, pool=pool if num_classes else None, **trunk)  # MAE: nothing pools
        self.options = options
        self.classifies = num_classes > 0
        self.loss_names = ("loss", "rec_loss", "cls_loss") if num_classes else ("loss", "rec_loss")
        self.cls_head = None
        if num_classes:
            self.cls_head = nn.Sequential(
                nn.Linear(embed_dim, cls_hidden_dim),
                nn.BatchNorm1d(cls_hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(cls_hidden_dim, num_classes),
            )
        self._register_load_state_dict_pre_hook(_rename_projection_head)
        self._init_weights()

    def classify(self, latent: torch.Tensor, labels: torch.Tensor | None):
        """(logits, scaled classification loss), each None where there is no branch or no labels."""
        if self.cls_head is None:
            return None, None
        logits = self.cls_head(self.pooled(latent))
        if labels is None:
            return logits, None
        return logits, classification_loss(logits, labels, ratio=self.options.cls_loss_ratio,
                                           temperature=self.options.temperature)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                noise: torch.Tensor | None = None, masking: Masking | None = None,
                ops: TrunkOps | None = None) -> Output:
        """`noise` (B, L) replaces the random draw; a loader's precomputed `masking` replaces both. `ops` are
        how the three data-movement steps run: the official way by default, the fast path's (`fast.FastOps`)
        under `fast.apply_kernels`; this forward is the one both run."""
        ops = ops or REFERENCE
        masking = self.masking_for(images, noise, masking)
        latent = self.encode(ops.embed_visible(self, images, masking.ids_keep))
        rec_loss, pred, _ = self.decode(latent, images, masking, ops)
        logits, cls_loss = self.classify(latent, labels)
        loss = rec_loss if cls_loss is None else rec_loss + cls_loss
        return Output(loss, rec_loss, cls_loss, pred, masking.mask, logits)


def _rename_projection_head(state_dict, prefix, *args):
    """The released SupMAE checkpoint calls the classification head `projection_head`."""
    old = prefix + "projection_head."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "cls_head." + key[len(old):]] = state_dict.pop(key)
