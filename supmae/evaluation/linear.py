"""`supmae eval linear`: BatchNorm (no affine) + Linear trained on the frozen encoder's features, as MAE's
linear probe does, on features extracted once; top-1 on the validation images."""
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from supmae.core.atomic import write_json
from supmae.evaluation.config import LinearConfig
from supmae.evaluation.pretrained import frozen_features
from supmae.training.optim import lr_at

logger = logging.getLogger(__name__)


def linear_probe(cfg: LinearConfig) -> dict:
    """SGD (momentum 0.9, no weight decay) of the head on features extracted once; the lr warms up linearly
    for min(10, total // 10) steps, then falls on a half-cycle cosine to 0."""
    name, num_classes, (train_f, train_y), (val_f, val_y) = frozen_features(cfg, batch_size=64, normalise=False)
    device, epochs = train_f.device, cfg.epochs
    torch.manual_seed(0)
    linear = nn.Linear(train_f.shape[1], num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    head = nn.Sequential(nn.BatchNorm1d(train_f.shape[1], affine=False, eps=1e-6), linear).to(device)
    batch_size = min(cfg.batch_size, len(train_y))
    peak = cfg.blr * batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=peak, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = len(train_y) // batch_size
    total = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(0)
    head.train()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_y), generator=generator).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, peak=peak, warmup=min(10, total // 10), total=total)
        rows = order[(step % steps_per_epoch) * batch_size:(step % steps_per_epoch + 1) * batch_size]
        F.cross_entropy(head(train_f[rows]), train_y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    head.eval()
    with torch.no_grad():
        accuracy = (head(val_f).argmax(1) == val_y).float().mean().item()
    logger.info(f"linear probe top-1: {accuracy:.2%} on {len(val_y)} images, {num_classes} classes "
                f"(chance {1 / num_classes:.2%}) after {epochs} epochs on frozen features; {name} from "
                f"{cfg.checkpoint}")
    result = dict(top1=accuracy, epochs=epochs, val_images=len(val_y), num_classes=num_classes)
    if cfg.json:
        write_json(cfg.json, result)
    return result
