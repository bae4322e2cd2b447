"""`supmae finetune`: the encoder, trained further on labels, scored by top-1.

Fine-tuning runs the exported encoder as a timm VisionTransformer (global average pooling, a fresh
head) with the official recipe (main_finetune.py, FINETUNE.md) as defaults: random resized crops of 0.08-1 and flips,
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, AdamW, layer-wise lr decay, drop path, label smoothing 0.1,
mixup 0.8 / cutmix 1.0, a per-step linear warm-up then half-cycle cosine to 1e-6, over an effective batch of
1024, with the family's lr, depth-dependent decay and drop path.
"""
import logging
import math
import os
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer

from supmae.core.atomic import check_space
from supmae.core.errors import SupmaeError
from supmae.evaluation import classifier
from supmae.evaluation.config import FinetuneConfig
from supmae.evaluation.export import timm_state_dict
from supmae.evaluation.pretrained import load_pretrained, open_splits, trained_config
from supmae.models.families import model_config, recipe_of
from supmae.pipelines.augment import CLASSIFIER_CROP_SCALE
from supmae.pipelines.batch import Batch
from supmae.pipelines.loader import LoaderSpec, create_loader, open_batches, ordered_batches
from supmae.pipelines.resolution import parse_resolution_schedule
from supmae.runtime.hardware import apply_compile, autocast_for, loader_workers, resolve_device, step_policy
from supmae.training.optim import lr_at
from supmae.training.step import train_step

logger = logging.getLogger(__name__)


def timm_vit(checkpoint: str, num_classes: int, drop_path: float = 0.0,
             dynamic_img_size: bool = False) -> VisionTransformer:
    """The checkpoint's encoder as timm's ViT with global average pooling and a fresh head."""
    model, trained = load_pretrained(checkpoint, "cpu")
    vit = classifier.timm_vit(trained.model, model.img_size, num_classes, drop_path, dynamic_img_size)
    missing = set(vit.load_state_dict(timm_state_dict(model.state_dict(), "avg"), strict=False).missing_keys)
    if missing != {"head.weight", "head.bias"}:
        raise SupmaeError(f"{checkpoint}'s encoder does not fill a timm ViT: missing {', '.join(sorted(missing))}")
    assert isinstance(vit.head, nn.Linear)
    nn.init.trunc_normal_(vit.head.weight, std=2e-5)  # MAE's fine-tuning head initialisation
    return vit


def layer_decay_groups(vit: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups whose lr scale falls by `layer_decay` per block from the head down to the embedding;
    no weight decay on biases, norms, the cls token and position embeddings."""
    layers = len(vit.blocks) + 1
    groups = {}
    for name, param in vit.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = layers
        decay = param.ndim > 1 and name not in ("cls_token", "pos_embed")
        group = groups.setdefault((layer, decay), dict(params=[], weight_decay=weight_decay if decay else 0.0,
                                                       lr_scale=layer_decay ** (layers - layer)))
        group["params"].append(param)
    return list(groups.values())


class FinetuneOutput(NamedTuple):
    loss: torch.Tensor

    def losses(self) -> dict[str, torch.Tensor]:
        return dict(loss=self.loss)


class FinetuneObjective(nn.Module):
    """The fine-tuning loss of a batch as one module, so the step compiles whole and runs through the same
    `train_step` as pretraining's: the ViT's logits against the labels (label-smoothed) or, under mixup and
    cutmix, against the mixed soft targets."""

    def __init__(self, vit: VisionTransformer, smoothing: float, mixing: bool):
        super().__init__()
        self.vit = vit
        self.criterion = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(smoothing)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, masking=None) -> FinetuneOutput:
        return FinetuneOutput(self.criterion(self.vit(images), targets))


def finetune_optimizer(vit: VisionTransformer, lr: float, weight_decay: float, layer_decay: float, *,
                       fused: bool = True) -> torch.optim.AdamW:
    """The official fine-tuning optimiser: AdamW with PyTorch's default betas over the layer-decay groups
    (fused into one kernel per step unless `fused` is off, as the official code's is)."""
    return torch.optim.AdamW(layer_decay_groups(vit, weight_decay, layer_decay), lr=lr, fused=fused)


@torch.no_grad()
def top1(model: nn.Module, source, *, loader: str, img_size: int, batch_size: int, workers: int, device) -> float:
    model.eval()
    correct = total = 0
    for batch in ordered_batches(loader, source, img_size=img_size, batch_size=batch_size, workers=workers,
                                 device=device):
        correct += (model(batch.images).argmax(1) == batch.labels).sum().item()
        total += len(batch.labels)
    return correct / total


def finetune(cfg: FinetuneConfig) -> dict:
    path = classifier.output_path(cfg.output, classifier.FINETUNED, cfg.force)
    device, workers = resolve_device(cfg.hardware.device), loader_workers(cfg.workers)
    train, val = open_splits(cfg.train, cfg.val)
    num_classes = len(train.classes)
    trained = trained_config(cfg.checkpoint)
    recipe = recipe_of(trained.model)
    epochs = recipe.finetune_epochs if cfg.epochs is None else cfg.epochs
    blr = recipe.finetune_blr if cfg.blr is None else cfg.blr
    layer_decay = recipe.finetune_layer_decay if cfg.layer_decay is None else cfg.layer_decay
    drop_path = recipe.finetune_drop_path if cfg.drop_path is None else cfg.drop_path
    resolution = None
    if cfg.resolution_schedule:
        resolution = parse_resolution_schedule(cfg.resolution_schedule, model_config(trained.model)["patch_size"])
        resolution.check(trained.trunk.img_size, epochs)
    torch.manual_seed(cfg.seed)
    vit = timm_vit(cfg.checkpoint, num_classes, drop_path, dynamic_img_size=resolution is not None).to(device)
    if path:
        check_space(os.path.dirname(path), sum(p.numel() * p.element_size() for p in vit.parameters()),
                    "the fine-tuned model")
    img_size = vit.patch_embed.img_size[0]
    micro = cfg.batch_size // cfg.accum_iter
    steps_per_epoch = len(train) // micro // cfg.accum_iter
    if steps_per_epoch < 1:
        raise SupmaeError(f"{len(train)} training images make no step of {cfg.batch_size}; pass a smaller "
                          "--batch-size")
    total, warmup = max(1, math.ceil(epochs * steps_per_epoch)), round(cfg.warmup_epochs * steps_per_epoch)
    peak = blr * cfg.batch_size / 256
    optimizer = finetune_optimizer(vit, peak, cfg.weight_decay, layer_decay)
    mix = mixer(cfg, num_classes)
    precision, compiled, mode = step_policy(device, cfg.hardware, accum_iter=cfg.accum_iter)
    objective = FinetuneObjective(vit, cfg.smoothing, mixing=mix is not None)
    forward = apply_compile(objective, mode) if compiled else objective
    scaler, autocast = torch.amp.GradScaler(device.type, enabled=precision == "fp16"), autocast_for(device, precision)
    spec = LoaderSpec(batch_size=micro, img_size=img_size, mask_sampler=None, device=device, workers=workers,
                      seed=cfg.seed, crop_scale=CLASSIFIER_CROP_SCALE, rand_augment="" if cfg.aa == "none" else cfg.aa,
                      erase=cfg.reprob, resolution=resolution)
    logger.info(f"fine-tuning for {epochs:g} epochs ({total} steps of {cfg.batch_size}), lr {peak:.3g} (blr {blr:g}), "
                f"layer decay {layer_decay:g}, drop path {drop_path:g}; {precision}"
                f"{f', compiled ({mode})' if compiled else ''}")
    vit.train()
    losses = torch.zeros((), device=device)  # read once an epoch: no host sync a step
    with open_batches(create_loader(cfg.loader, train, spec)) as batches:
        for step in range(total):
            lr = lr_at(step, peak=peak, warmup=warmup, total=total, min_lr=cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            micro_batches = [mixed(next(batches), mix) for _ in range(cfg.accum_iter)]
            losses += train_step(forward, micro_batches, optimizer, scaler, autocast)[0]
            if (step + 1) % max(1, steps_per_epoch) == 0 or step + 1 == total:
                done = (step % max(1, steps_per_epoch)) + 1
                logger.info(f"step {step + 1}/{total}: loss {losses.item() / done:.4f}, lr {lr:.3g}, side "
                            f"{micro_batches[-1].images.shape[-1]}")
                losses.zero_()
    accuracy = top1(vit, val, loader=cfg.loader, img_size=img_size, batch_size=micro, workers=workers,
                    device=device)
    logger.info(f"fine-tuned top-1: {accuracy:.2%} on {len(val)} images, {num_classes} classes "
                f"(chance {1 / num_classes:.2%}) after {total} steps")
    if path:
        classifier.save_finetuned(path, vit, model=trained.model, img_size=img_size, classes=train.classes)
    return dict(top1=accuracy, steps=total, val_images=len(val), num_classes=num_classes)


def mixer(cfg, num_classes: int) -> Mixup | None:
    """timm's mixup/cutmix as the official recipe sets it (one of the two per batch, switch probability 0.5,
    label smoothing in the targets), or None when both are off. `cfg`: a FinetuneConfig."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def mixed(batch: Batch, mix: Mixup | None) -> Batch:
    """A batch with its images mixed and its labels the soft targets, when mixing."""
    if mix is None:
        return batch
    images, targets = mix(batch.images, batch.labels)
    return batch._replace(images=images, labels=targets)
