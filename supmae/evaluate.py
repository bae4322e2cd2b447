"""`supmae eval knn`: how well a frozen encoder's features separate the classes, with no training.

Features are `MaskedAutoencoderViT.features` of centre crops, L2-normalised; each validation image
takes a vote of its k most cosine-similar training images, weighted exp(similarity / T) (the weighted
k-NN of Wu et al. 2018, as DINO evaluates it).
"""
import torch
import torch.nn.functional as F

from supmae.checkpoint import load_checkpoint
from supmae.errors import SupmaeError
from supmae.pipelines.sources import open_source
from supmae.pipelines.torch_loader import ordered_views
from supmae.train import build_model, config_of, resolve_device


def load_pretrained(checkpoint: str, device: torch.device):
    """The whole pretrained model, decoder included, in eval mode on `device`, and its config."""
    state = load_checkpoint(checkpoint)
    cfg = config_of(state)
    model = build_model(cfg, len(state.get("classes") or []) or 1)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


@torch.no_grad()
def extract(model, source, img_size: int, batch_size: int, workers: int, device, pool: str, normalise: bool = True):
    features, labels = [], []
    for batch in ordered_views(source, img_size, batch_size, workers, device):
        f = model.features(batch.images, pool).float()
        features.append(F.normalize(f, dim=1) if normalise else f)
        labels.append(batch.labels)
    return torch.cat(features), torch.cat(labels)


def knn_top1(train_features, train_labels, val_features, val_labels, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024) -> float:
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


def frozen_features(checkpoint: str, train: str, val: str, batch_size: int, workers: int, device, pool: str = "avg",
                    normalise: bool = True):
    """(model name, number of classes, (train features, labels), (val features, labels)) of the frozen encoder."""
    model, cfg = load_pretrained(checkpoint, device)
    sources = open_splits(train, val)
    return cfg.model, len(sources[0].classes), *(
        extract(model, s, cfg.img_size, batch_size, workers, device, pool, normalise) for s in sources)


def eval_knn(checkpoint: str, train: str, val: str, k: int = 20, temperature: float = 0.07, batch_size: int = 64,
             workers: int = 2, device: str = "auto", pool: str = "avg", log=print) -> dict:
    name, num_classes, (train_f, train_y), (val_f, val_y) = frozen_features(
        checkpoint, train, val, batch_size, workers, resolve_device(device), pool)
    top1 = knn_top1(train_f, train_y, val_f, val_y, k, temperature)
    log(f"k-NN (k={k}, T={temperature}) top-1: {top1:.2%} on {len(val_y)} images, {num_classes} "
        f"classes (chance {1 / num_classes:.2%}); {name} from {checkpoint}")
    return dict(top1=top1, k=k, temperature=temperature, train_images=len(train_y), val_images=len(val_y),
                num_classes=num_classes, model=name, checkpoint=checkpoint, pool=pool)
