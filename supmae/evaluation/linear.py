"""`supmae eval linear`: the official linear probe (main_linprobe.py). A BatchNorm (no affine, eps 1e-6) and a
Linear head learn, with LARS, from the frozen encoder's cls token (after its final norm) of random resized
crops (scale 0.08-1) and flips of the training images, drawn afresh every epoch; the lr warms up for 10 epochs,
then falls on a half-cycle cosine, stepped per iteration. Top-1 is read on the validation images' centre crops.
"""
import logging

import torch
import torch.nn.functional as F

from supmae.core.atomic import write_json
from supmae.core.errors import SupmaeError
from supmae.evaluation import classifier
from supmae.evaluation.config import LinearConfig
from supmae.evaluation.pretrained import extract, load_pretrained, open_splits
from supmae.models.families import recipe_of
from supmae.pipelines.augment import CLASSIFIER_CROP_SCALE
from supmae.pipelines.loader import LoaderSpec, create_loader, open_batches
from supmae.runtime.hardware import autocast_for, loader_workers, resolve_device, speed_defaults
from supmae.training.optim import LARS, lr_at

logger = logging.getLogger(__name__)


def linear_probe(cfg: LinearConfig) -> dict:
    path = classifier.output_path(cfg.output, classifier.PROBE, cfg.force)
    device, workers = resolve_device(cfg.hardware.device), loader_workers(cfg.workers)
    model, trained = load_pretrained(cfg.checkpoint, device)
    train, val = open_splits(cfg.train, cfg.val)
    recipe = recipe_of(trained.model)
    epochs = recipe.linear_epochs if cfg.epochs is None else cfg.epochs
    batch = recipe.linear_batch if cfg.batch_size is None else cfg.batch_size
    micro = min(cfg.micro_batch, batch)
    if batch % micro:
        raise SupmaeError(f"--batch-size {batch} is not a whole number of --micro-batch {micro} forward passes")
    accum = batch // micro
    steps_per_epoch = len(train) // micro // accum
    if steps_per_epoch < 1:
        raise SupmaeError(f"{len(train)} training images make no step of {batch}"
                          f"{' (the family recipe)' if cfg.batch_size is None else ''}; pass a smaller --batch-size")
    total, warmup = epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    num_classes, peak = len(train.classes), cfg.blr * batch / 256
    torch.manual_seed(cfg.seed)
    head = classifier.probe_head(model.embed_dim, num_classes).to(device)
    optimizer = LARS(head.parameters(), lr=peak, weight_decay=cfg.weight_decay)
    autocast = autocast_for(device, speed_defaults(device)[0])
    spec = LoaderSpec(batch_size=micro, img_size=model.img_size, mask_sampler=None, device=device, workers=workers,
                      seed=cfg.seed, crop_scale=CLASSIFIER_CROP_SCALE)
    logger.info(f"linear probe of {trained.model}'s {cfg.pool} feature: {epochs} epochs of {steps_per_epoch} LARS "
                f"steps of {batch} ({accum} x {micro}), lr {peak:.3g}")
    head.train()
    with open_batches(create_loader(cfg.loader, train, spec)) as batches:
        for step in range(total):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, peak=peak, warmup=warmup, total=total)
            for _ in range(accum):
                views = next(batches)
                with torch.no_grad(), autocast:
                    features = model.features(views.images, cfg.pool).float()
                (F.cross_entropy(head(features), views.labels) / accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    val_features, val_labels = extract(model, val, loader=cfg.loader, img_size=model.img_size, batch_size=micro,
                                       workers=workers, device=device, pool=cfg.pool, normalise=False)
    head.eval()
    with torch.no_grad():
        accuracy = (head(val_features).argmax(1) == val_labels).float().mean().item()
    logger.info(f"linear probe top-1: {accuracy:.2%} on {len(val_labels)} images, {num_classes} classes "
                f"(chance {1 / num_classes:.2%}) after {epochs} epochs; {trained.model} from {cfg.checkpoint}")
    if path:
        classifier.save_probe(path, head, checkpoint=cfg.checkpoint, pool=cfg.pool, classes=train.classes)
    result = dict(top1=accuracy, epochs=epochs, batch_size=batch, lr=peak, pool=cfg.pool, val_images=len(val_labels),
                  num_classes=num_classes, model=trained.model, checkpoint=cfg.checkpoint)
    if cfg.json:
        write_json(cfg.json, result)
    return result
