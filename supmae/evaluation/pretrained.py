"""A pretraining checkpoint as evaluation reads it: the whole model, the labelled splits it is scored on, and
the frozen encoder's features of their images."""
import torch
import torch.nn.functional as F

from supmae.core.errors import SupmaeError
from supmae.models.clip import CLIPViT
from supmae.models.registry import build_model
from supmae.models.trunk import MaskedViT
from supmae.pipelines.loader import ordered_batches
from supmae.pipelines.sources import open_source
from supmae.runtime.hardware import loader_workers, resolve_device
from supmae.training.checkpoint import load_checkpoint, saved_config
from supmae.training.config import PretrainConfig


def load_pretrained(checkpoint: str, device: torch.device | str) -> tuple[MaskedViT, PretrainConfig]:
    """The whole pretrained model, decoder included, in eval mode on `device`, and its config."""
    state = load_checkpoint(checkpoint)
    cfg = saved_config(state)
    model = build_model(cfg.model, cfg, len(state.get("classes") or []) or 1)
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


def open_splits(train: str, val: str):
    """The train and validation sources, which must name the same classes."""
    sources = open_source(train), open_source(val)
    if sources[0].classes != sources[1].classes:
        raise SupmaeError(f"{train} and {val} name different classes")
    return sources


def frozen_features(cfg, *, batch_size: int, pool: str = "avg", normalise: bool = True):
    """(model name, number of classes, (train features, labels), (val features, labels)) of the frozen
    encoder of `cfg` (a SplitsConfig)."""
    device = resolve_device(cfg.hardware.device)
    model, trained = load_pretrained(cfg.checkpoint, device)
    sources = open_splits(cfg.train, cfg.val)
    return trained.model, len(sources[0].classes), *(
        extract(model, s, loader=cfg.loader, img_size=model.img_size, batch_size=batch_size,
                workers=loader_workers(cfg.workers), device=device, pool=pool, normalise=normalise) for s in sources)


def trained_config(checkpoint: str) -> PretrainConfig:
    """The configuration a checkpoint was pretrained with, read without loading its tensors."""
    return saved_config(load_checkpoint(checkpoint, mmap=True))


def load_text_model(checkpoint: str, device: torch.device | str) -> tuple[CLIPViT, PretrainConfig]:
    """`load_pretrained` for zero-shot and retrieval, which need a CLIP-family model."""
    model, trained = load_pretrained(checkpoint, device)
    if not isinstance(model, CLIPViT):
        raise SupmaeError(f"{checkpoint} holds {trained.model}, which has no text tower; zero-shot and retrieval "
                          "need a CLIP-family model")
    return model, trained
