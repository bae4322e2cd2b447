"""The classifiers evaluation writes and reads back: a fine-tuned ViT (`finetune --output`) and a frozen encoder
with a linear probe's head (`eval linear --output`). Each is one safetensors file whose metadata says how to
rebuild it and which classes its outputs are, so `eval robustness` scores either."""
import json
import os
import zipfile
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from supmae.core.atomic import replaced
from supmae.core.errors import SupmaeError
from supmae.evaluation.pretrained import load_pretrained
from supmae.models.families import model_config
from supmae.models.trunk import MaskedViT

FINETUNED, PROBE = "model.safetensors", "probe.safetensors"  # what each command's --output folder receives


class Classifier(NamedTuple):
    module: nn.Module     # (B, 3, H, W) normalised images -> (B, len(classes)) logits, in eval mode
    classes: list[str]    # what each logit is
    img_size: int         # the side its images are read at


def timm_vit(name: str, img_size: int, num_classes: int, drop_path: float = 0.0,
             dynamic_img_size: bool = False) -> VisionTransformer:
    """A timm ViT with global average pooling of the named model's encoder architecture, at `img_size` (and,
    with `dynamic_img_size`, at smaller sides too, its positions resampled by timm)."""
    arch = model_config(name, img_size=img_size)
    return VisionTransformer(img_size=img_size, patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
                             depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"],
                             qkv_bias=True, num_classes=num_classes, global_pool="avg", drop_path_rate=drop_path,
                             dynamic_img_size=dynamic_img_size)


class ProbedEncoder(nn.Module):
    """A frozen pretrained encoder's feature (`pool`) through a linear probe's head."""

    def __init__(self, encoder: MaskedViT, pool: str, head: nn.Module):
        super().__init__()
        self.encoder, self.pool, self.head = encoder, pool, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(images, self.pool).float())


def probe_head(width: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d without affine (eps 1e-6) then Linear, its weight truncated normal with std 0.01 (MoCo v3's)."""
    linear = nn.Linear(width, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), linear)


def output_path(folder: str | None, name: str, force: bool) -> str | None:
    """Where a command's --output `folder` gets its `name` file, made ready now, so a bad folder fails at once
    rather than after the whole run; None without a folder."""
    if not folder:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise SupmaeError(f"--output {folder} is a file, not a folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SupmaeError(f"--output {folder} is a folder this user cannot write to")
    path = os.path.join(folder, name)
    if os.path.exists(path) and not force:
        raise SupmaeError(f"{path} exists; pass --force to replace it")
    return path


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`tensors` at `path`, written whole or not at all."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        with replaced(path) as tmp:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    except SafetensorError as error:  # safetensors reports failed writes in its own type, not as OSError
        raise SupmaeError(f"cannot write {path}: {error}") from None


def save_finetuned(path: str, vit: VisionTransformer, *, model: str, img_size: int, classes: list[str]) -> None:
    write_safetensors(path, vit.state_dict(), {"format": "pt", "supmae_classifier": "finetuned", "supmae_model": model,
                                               "img_size": str(img_size), "classes": json.dumps(classes)})


def save_probe(path: str, head: nn.Module, *, checkpoint: str, pool: str, classes: list[str]) -> None:
    write_safetensors(path, head.state_dict(), {"format": "pt", "supmae_classifier": "probe", "pool": pool,
                                                "checkpoint": os.path.abspath(checkpoint),
                                                "classes": json.dumps(classes)})


def load_classifier(path: str, device: torch.device | str) -> Classifier:
    """The classifier at `path`: a fine-tuned model or a linear probe, or the --output folder holding one."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in (FINETUNED, PROBE) if os.path.isfile(os.path.join(path, name))]
        if len(found) != 1:
            raise SupmaeError(f"{path} holds {'both' if found else 'neither'} {FINETUNED} (finetune --output) "
                              f"{'and' if found else 'nor'} {PROBE} (eval linear --output); name the file")
        path = found[0]
    if zipfile.is_zipfile(path):
        raise SupmaeError(f"{path} is a pretraining checkpoint, not a classifier: fine-tune it (supmae finetune "
                          "--output DIR) or probe it (supmae eval linear --output DIR) first")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as error:  # safetensors raises its own types for a file that is not one
        raise SupmaeError(f"{path} is not a safetensors file: {str(error).splitlines()[0]}") from None
    kind = meta.get("supmae_classifier")
    if kind not in ("finetuned", "probe"):
        raise SupmaeError(f"{path} is not a classifier supmae wrote (finetune --output or eval linear --output)")
    classes, tensors = json.loads(meta["classes"]), load_file(path)
    if kind == "finetuned":
        img_size = int(meta["img_size"])
        module = timm_vit(meta["supmae_model"], img_size, len(classes))
        module.load_state_dict(tensors)
    else:
        encoder, _ = load_pretrained(meta["checkpoint"], "cpu")
        head = probe_head(encoder.embed_dim, len(classes))
        head.load_state_dict(tensors)
        module, img_size = ProbedEncoder(encoder, meta["pool"], head), encoder.img_size
    return Classifier(module.to(device).eval(), classes, img_size)
