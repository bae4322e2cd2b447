"""`supmae eval retrieval`: over a captioned set, how often an image's own caption is among the k captions
nearest it in a CLIP-family model's shared embedding, and the other way round."""
import logging

import torch

from supmae.core.atomic import write_json
from supmae.evaluation.config import RetrievalConfig
from supmae.evaluation.pretrained import load_text_model
from supmae.pipelines.loader import ordered_batches
from supmae.pipelines.sources import open_source
from supmae.runtime.hardware import loader_workers, resolve_device

logger = logging.getLogger(__name__)


def recall_at(similarity: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Recall@k of row i's match being column i, for each k (capped at the number of columns): the match's
    position in the row ranked by score, a column scoring the same as the match (a repeated caption, say)
    ranked ahead of it, so a tie never counts for the model."""
    rank = (similarity >= similarity.diagonal()[:, None]).sum(1) - 1  # the other columns at or above the match
    return {f"r@{k}": (rank < k).float().mean().item() for k in ks}


def eval_retrieval(cfg: RetrievalConfig) -> dict:
    device = resolve_device(cfg.hardware.device)
    model, trained = load_text_model(cfg.checkpoint, device)
    source = open_source(cfg.data)
    images, texts = [], []
    with torch.no_grad():
        for batch in ordered_batches(cfg.loader, source, img_size=model.img_size, batch_size=cfg.batch_size,
                                     workers=loader_workers(cfg.workers), device=device, text=True):
            images.append(model.image_features(batch.images).float())
            assert batch.tokens is not None  # asked for with text=True
            texts.append(model.text_features(batch.tokens).float())
    similarity = torch.cat(images) @ torch.cat(texts).T
    image_to_text, text_to_image = recall_at(similarity), recall_at(similarity.T)
    result = dict(image_to_text=image_to_text, text_to_image=text_to_image, pairs=len(similarity),
                  model=trained.model, checkpoint=cfg.checkpoint)
    logger.info(f"retrieval over {len(similarity)} pairs: image->text "
                + ", ".join(f"{k} {v:.2%}" for k, v in image_to_text.items()) + "; text->image "
                + ", ".join(f"{k} {v:.2%}" for k, v in text_to_image.items()))
    if cfg.json:
        write_json(cfg.json, result)
    return result
