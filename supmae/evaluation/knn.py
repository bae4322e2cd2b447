"""`supmae eval knn`: how well a frozen encoder's features separate the classes, with no training.

Features are `MaskedViT.features` of centre crops, L2-normalised; each validation image takes a vote of
its k most cosine-similar training images, weighted exp(similarity / T) (the weighted k-NN of Wu et al.
2018, as DINO evaluates it).
"""
import logging

import torch

from supmae.core.atomic import write_json
from supmae.evaluation.config import KnnConfig
from supmae.evaluation.pretrained import frozen_features

logger = logging.getLogger(__name__)


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
