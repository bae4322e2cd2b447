"""`supmae eval zeroshot`: what a CLIP-family model's shared embedding knows of the classes.

Each class's embedding is the mean of its name's text embeddings in prompt templates (open_clip's
templates), renormalised, and an image takes the class nearest its own embedding.
"""
import logging
import os
import re

import torch

from supmae.core.atomic import write_json
from supmae.core.errors import SupmaeError
from supmae.evaluation.config import ZeroshotConfig
from supmae.evaluation.pretrained import load_text_model
from supmae.pipelines.loader import ordered_batches
from supmae.pipelines.sources import open_source
from supmae.pipelines.synthetic import CLASS_NAMES
from supmae.pipelines.text import encode
from supmae.runtime.hardware import loader_workers, resolve_device

logger = logging.getLogger(__name__)
_WORDNET = re.compile(r"^n\d{8}$")


def names_file(data: str, source=None) -> str | None:
    """The CLASS_NAMES file that goes with `data`: inside it (a folder, as the embedded dataset has it), beside
    it (a .beton or a file list), or in the folder a .beton was converted from."""
    places = [data if os.path.isdir(data) else os.path.dirname(os.path.abspath(data))]
    converted_from = getattr(source, "sidecar", {}).get("source")
    if converted_from:
        places.append(converted_from if os.path.isdir(converted_from) else os.path.dirname(converted_from))
    return next((os.path.join(p, CLASS_NAMES) for p in places if os.path.isfile(os.path.join(p, CLASS_NAMES))),
                None)


def class_names(classes: list[str], path=None) -> tuple[list[str], str]:
    """The words for each class and where they came from: a file's lines (`path`), ImageNet's names for its 1000
    WordNet ids, or the class names made readable ("0003_red_fox" -> "red fox"). A file may name more classes
    than data labelled by number holds (the full set of shards of which some were cut): they are all
    candidates."""
    if path:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        numbered = classes == [str(i) for i in range(len(classes))]
        if len(names) != len(classes) and not (numbered and len(names) > len(classes)):
            raise SupmaeError(f"{path} names {len(names)} classes; the data has {len(classes)}")
        return names, path
    if len(classes) == 1000 and all(_WORDNET.match(c) for c in classes):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        return list(IMAGENET_CLASSNAMES), "ImageNet's names of its WordNet ids"
    return [re.sub(r"^\d+[_ -]", "", c).replace("_", " ").strip() for c in classes], "the data's class names"


def templates(kind: str) -> list:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
    return list(SIMPLE_IMAGENET_TEMPLATES if kind == "simple" else OPENAI_IMAGENET_TEMPLATES)


@torch.no_grad()
def class_embeddings(model, names: list[str], prompts: list, device) -> torch.Tensor:
    """(C, E) unit embeddings, each the renormalised mean over the prompts of one class name."""
    rows = []
    for name in names:
        tokens = torch.stack([torch.from_numpy(encode(prompt(name)).tokens) for prompt in prompts]).to(device).long()
        rows.append(torch.nn.functional.normalize(model.text_features(tokens).float().mean(0), dim=0))
    return torch.stack(rows)


def eval_zeroshot(cfg: ZeroshotConfig) -> dict:
    device = resolve_device(cfg.hardware.device)
    model, trained = load_text_model(cfg.checkpoint, device)
    source = open_source(cfg.data)
    names, origin = class_names(source.classes, cfg.class_names or names_file(cfg.data, source))
    logger.info(f"class names: {origin} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if all(name.isdigit() for name in names):
        logger.warning(f"the classes of {cfg.data} are label numbers ({names[0]}..{names[-1]}), and zero-shot "
                       f"prompts them as they are: give the words with --class-names FILE, or a {CLASS_NAMES} beside "
                       "the data")
    classes = class_embeddings(model, names, templates(cfg.templates), device)
    correct1 = correct5 = total = 0
    with torch.no_grad():
        for batch in ordered_batches(cfg.loader, source, img_size=model.img_size, batch_size=cfg.batch_size,
                                     workers=loader_workers(cfg.workers), device=device):
            scores = model.image_features(batch.images).float() @ classes.T
            top = scores.topk(min(5, len(names)), dim=1).indices
            correct1 += (top[:, 0] == batch.labels).sum().item()
            correct5 += (top == batch.labels[:, None]).any(1).sum().item()
            total += len(batch.labels)
    result = dict(top1=correct1 / total, top5=correct5 / total, images=total, num_classes=len(names),
                  class_names=origin, templates=cfg.templates, model=trained.model, checkpoint=cfg.checkpoint)
    logger.info(f"zero-shot top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%} on {total} images, {len(names)} "
                f"classes (chance {1 / len(names):.2%}); {trained.model} from {cfg.checkpoint}")
    if cfg.json:
        write_json(cfg.json, result)
    return result
