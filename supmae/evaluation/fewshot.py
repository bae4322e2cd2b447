"""`supmae eval fewshot`: few-shot transfer (SupMAE's third claim) on the frozen encoder's features.

For each k and seed, k training images of each class are drawn, and a logistic regression head (multinomial,
an L2 penalty on its weights, fitted to convergence by L-BFGS) learns from their L2-normalised features; its
top-1 is read on every validation image. The result is the mean and sample standard deviation over the seeds,
as few-shot transfer tables report them.
"""
import logging
import statistics

import numpy as np
import torch
import torch.nn.functional as F

from supmae.core.atomic import write_json
from supmae.core.errors import SupmaeError
from supmae.evaluation.config import FewshotConfig
from supmae.evaluation.pretrained import frozen_features
from supmae.pipelines.sources import open_source

logger = logging.getLogger(__name__)


def draw_shots(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The indices of k examples of each class, drawn by `seed`, in class order."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in range(int(labels.max()) + 1):
        members = (labels.cpu() == label).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picked)


def logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float) -> torch.nn.Linear:
    """A linear head minimising cross-entropy + l2 * |W|^2 on (features, labels), by L-BFGS."""
    head = torch.nn.Linear(features.shape[1], num_classes).to(features.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-7,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + l2 * head.weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(objective)
    return head


def eval_fewshot(cfg: FewshotConfig) -> dict:
    train = open_source(cfg.train)  # checked before any image is read
    counts = np.bincount(train.labels, minlength=len(train.classes))
    fewest = int(counts.argmin())
    if max(cfg.shot_list) > counts[fewest]:
        raise SupmaeError(f"--shots {max(cfg.shot_list)}: class {train.classes[fewest]!r} of {cfg.train} has "
                          f"{counts[fewest]} training image(s)")
    name, num_classes, (train_f, train_y), (val_f, val_y) = frozen_features(cfg, batch_size=cfg.batch_size,
                                                                            pool=cfg.pool)
    results = {}
    for k in cfg.shot_list:
        top1 = []
        for seed in range(cfg.seeds):
            shots = draw_shots(train_y, k, seed).to(train_f.device)
            head = logistic_regression(train_f[shots], train_y[shots], num_classes, cfg.l2)
            with torch.no_grad():
                top1.append((head(val_f).argmax(1) == val_y).float().mean().item())
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        results[str(k)] = dict(mean=statistics.fmean(top1), std=spread, top1=top1)
        logger.info(f"{k}-shot top-1: {100 * results[str(k)]['mean']:.1f} ± {100 * spread:.1f} over {cfg.seeds} "
                    f"seed(s), {len(val_y)} images, {num_classes} classes (chance {1 / num_classes:.1%})")
    result = dict(shots=results, seeds=cfg.seeds, pool=cfg.pool, l2=cfg.l2, num_classes=num_classes,
                  val_images=len(val_y), model=name, checkpoint=cfg.checkpoint)
    if cfg.json:
        write_json(cfg.json, result)
    return result
