"""`supmae eval knn`: how well a frozen encoder's features separate the classes, with no training.

Features are `MaskedAutoencoderViT.features` of centre crops, L2-normalised; each validation image
takes a vote of its k most cosine-similar training images, weighted exp(similarity / T) (the weighted
k-NN of Wu et al. 2018, as DINO evaluates it).
"""
import logging

import torch
import torch.nn.functional as F

from supmae.checkpoint import load_checkpoint, saved_config
from supmae.config import KnnConfig
from supmae.errors import SupmaeError
from supmae.hardware import loader_workers, resolve_device
from supmae.measure import write_json
from supmae.pipelines.loader import ordered_batches
from supmae.pipelines.sources import open_source
from supmae.registry import build_model

logger = logging.getLogger(__name__)


def load_pretrained(checkpoint: str, device: torch.device):
    """The whole pretrained model, decoder included, in eval mode on `device`, and its config."""
    state = load_checkpoint(checkpoint)
    cfg = saved_config(state)
    model = build_model(cfg, len(state.get("classes") or []) or 1)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


@torch.no_grad()
def extract(model, source, *, loader: str, img_size: int, batch_size: int, workers: int, device, pool: str,
            normalise: bool = True):
    features, labels = [], []
    for batch in ordered_batches(loader, source, img_size=img_size, batch_size=batch_size, workers=workers,
                                 device=device):
        f = model.features(batch.images, pool).float()
        features.append(F.normalize(f, dim=1) if normalise else f)
        labels.append(batch.labels)
    return torch.cat(features), torch.cat(labels)


def knn_top1(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *, k: int = 20,
             temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 of the weighted k-NN vote; `train` and `val` are (features, labels)."""
    (train_features, train_labels), (val_features, val_labels) = train, val
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    k = min(k, len(train_labels))
    correct = 0
    for first in range(0, len(val_labels), chunk):
        similarity, nearest = (val_features[first:first + chunk] @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(nearest), num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[nearest], (similarity / temperature).exp())
        correct += (votes.argmax(1) == val_labels[first:first + chunk]).sum().item()
    return correct / len(val_labels)


def open_splits(train: str, val: str):
    """The train and validation sources, which must name the same classes."""
    sources = open_source(train), open_source(val)
    if sources[0].classes != sources[1].classes:
        raise SupmaeError(f"{train} and {val} name different classes")
    return sources


def frozen_features(cfg, *, batch_size: int, pool: str = "avg", normalise: bool = True):
    """(model name, number of classes, (train features, labels), (val features, labels)) of the frozen
    encoder of `cfg` (a SplitsConfig)."""
    device = resolve_device(cfg.device)
    model, trained = load_pretrained(cfg.checkpoint, device)
    sources = open_splits(cfg.train, cfg.val)
    return trained.model, len(sources[0].classes), *(
        extract(model, s, loader=cfg.loader, img_size=trained.img_size, batch_size=batch_size,
                workers=loader_workers(cfg.workers), device=device, pool=pool, normalise=normalise) for s in sources)


def eval_knn(cfg: KnnConfig) -> dict:
    name, num_classes, train, val = frozen_features(cfg, batch_size=cfg.batch_size, pool=cfg.pool)
    top1 = knn_top1(train, val, k=cfg.k, temperature=cfg.temperature)
    logger.info(f"k-NN (k={cfg.k}, T={cfg.temperature}) top-1: {top1:.2%} on {len(val[1])} images, {num_classes} "
                f"classes (chance {1 / num_classes:.2%}); {name} from {cfg.checkpoint}")
    result = dict(top1=top1, k=cfg.k, temperature=cfg.temperature, train_images=len(train[1]),
                  val_images=len(val[1]), num_classes=num_classes, model=name, checkpoint=cfg.checkpoint, pool=cfg.pool)
    if cfg.json:
        write_json(cfg.json, result)
    return result
