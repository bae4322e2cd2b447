"""`supmae eval robustness`: a classifier's top-1 under distribution shift (SupMAE's second claim).

ImageNet-C (Hendrycks & Dietterich 2019) is read in its published layout, `corruption/severity/class/images`:
top-1 for every corruption and severity present, and for each corruption present at all five severities its
corruption error relative to AlexNet's, CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}; mCE is their mean
(x 100, lower is better). Its images are already the 224-pixel centre crops, so they are read whole.
ImageNet-A and ImageNet-R hold 200 of ImageNet's 1000 classes: an image is scored by the logits of those
classes alone. ImageNet-Sketch holds all 1000. With --corrupt, ImageNet-C is made on the fly from any labelled
set as it was made from ImageNet's validation images: each image's evaluation view (the centre crop) is
corrupted by imagecorruptions' implementation of the 15 corruptions, its noise seeded by (seed, corruption,
severity, image), so a run is repeatable.
"""
import inspect
import logging
import multiprocessing
import os

import numpy as np
import torch

from supmae.core.atomic import write_json
from supmae.core.errors import SupmaeError
from supmae.core.options import items
from supmae.evaluation.classifier import Classifier, load_classifier
from supmae.evaluation.config import CORRUPTIONS, SEVERITIES, RobustnessConfig
from supmae.pipelines.augment import EVAL_CROP_FRACTION, center_crop, crop_resize_flip
from supmae.pipelines.batch import to_device_batches
from supmae.pipelines.loader import ordered_batches
from supmae.pipelines.sources import open_source
from supmae.runtime.hardware import loader_workers, resolve_device

logger = logging.getLogger(__name__)
# AlexNet's top-1 error on each ImageNet-C corruption, averaged over the five severities (Hendrycks & Dietterich
# 2019; the values their code and later benchmarks normalise by).
ALEXNET_ERRORS = dict(gaussian_noise=0.886428, shot_noise=0.894468, impulse_noise=0.922640, defocus_blur=0.819880,
                      glass_blur=0.826268, motion_blur=0.785948, zoom_blur=0.798360, snow=0.866816, frost=0.826572,
                      fog=0.819324, brightness=0.564592, contrast=0.853204, elastic_transform=0.646056,
                      pixelate=0.717840, jpeg_compression=0.606500)


def logit_indices(data_classes: list[str], model_classes: list[str], where: str) -> list[int] | None:
    """For each class of the data, the classifier's output that is it; None when they are the same classes."""
    if data_classes == model_classes:
        return None
    outputs = {name: i for i, name in enumerate(model_classes)}
    for name in data_classes:
        if name not in outputs:
            raise SupmaeError(f"the classes of {where} do not map to the classifier's: {name!r} is not among its "
                              f"{len(model_classes)} classes")
    return [outputs[name] for name in data_classes]


def _correct(model: Classifier, images: torch.Tensor, labels: torch.Tensor, indices: list[int] | None) -> int:
    logits = model.module(images)
    if indices is not None:
        logits = logits[:, indices]
    return int((logits.argmax(1) == labels).sum().item())


@torch.no_grad()
def top1(model: Classifier, path: str, cfg: RobustnessConfig, device, *, center_fraction: float) -> float:
    source = open_source(path)
    indices = logit_indices(source.classes, model.classes, path)
    correct = sum(_correct(model, b.images, b.labels, indices)
                  for b in ordered_batches(cfg.loader, source, img_size=model.img_size, batch_size=cfg.batch_size,
                                           workers=loader_workers(cfg.workers), device=device,
                                           center_fraction=center_fraction))
    return correct / len(source)


def imagenet_c_layout(root: str) -> dict[str, list[str]] | None:
    """ImageNet-C's corruptions and severities found in `root`, or None when it is not laid out as ImageNet-C
    (no folder of it is named for a corruption). SupmaeError for a layout that is half ImageNet-C's."""
    folders = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
    named = [name for name in folders if name in CORRUPTIONS]
    if not named:
        return None
    if len(named) < len(folders):
        others = sorted(set(folders) - set(named))
        raise SupmaeError(f"{root} is not ImageNet-C's layout (corruption/severity/class/images): {others[0]!r} is "
                          f"not one of its corruptions")
    found = {}
    for corruption in named:
        severities = sorted(os.listdir(os.path.join(root, corruption)))
        if not severities or not set(severities) <= set(SEVERITIES):
            raise SupmaeError(f"{os.path.join(root, corruption)} is not ImageNet-C's layout: its folders should be "
                              f"the severities 1 to 5, found {', '.join(severities) or 'none'}")
        found[corruption] = severities
    return found


_views = None  # the source a corruption worker reads, set before the pool forks


def _corrupted_view(job) -> np.ndarray:
    from imagecorruptions import corrupt, corruption_dict
    index, size, corruption, severity, seed = job
    image = _views.image(index)  # pyright: ignore[reportOptionalMemberAccess]  (set before any job runs)
    view = np.array(crop_resize_flip(image, size, center_crop(image.width, image.height), False))
    if corruption is None:
        return view
    key = (seed, CORRUPTIONS.index(corruption), severity, index)
    seed = int(np.random.SeedSequence(key).generate_state(1, np.uint32)[0])
    np.random.seed(seed)  # most corruptions draw from numpy's global generator; the others take a seed
    given = {"seed": seed} if "seed" in inspect.signature(corruption_dict[corruption]).parameters else {}
    return np.ascontiguousarray(corrupt(view, corruption_name=corruption, severity=severity, **given), np.uint8)


@torch.no_grad()
def corrupted_top1(model: Classifier, cfg: RobustnessConfig, device) -> tuple[float, dict]:
    """(top-1 of the clean views, {corruption: {severity: top-1}}) of --data corrupted on the fly."""
    global _views
    try:
        from imagecorruptions import corrupt
    except ImportError as error:
        raise SupmaeError(f"--corrupt needs the imagecorruptions-imaug package: {error}") from None
    corrupt(np.zeros((32, 32, 3), np.uint8), corruption_name="glass_blur")  # compiles its kernel once, before forking
    source = open_source(cfg.data)
    indices = logit_indices(source.classes, model.classes, cfg.data)
    _views = source
    workers = loader_workers(cfg.workers)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers else None
    try:
        def score(corruption: str | None, severity: int | None) -> float:
            jobs = [(i, model.img_size, corruption, severity, cfg.seed) for i in range(len(source))]
            views = pool.imap(_corrupted_view, jobs, chunksize=4) if pool else map(_corrupted_view, jobs)
            host = _host_batches(views, source.labels, cfg.batch_size)
            return sum(_correct(model, b.images, b.labels, indices)
                       for b in to_device_batches(host, device, None)) / len(source)

        clean = score(None, None)
        results = {}
        for corruption in items(cfg.corruptions):
            results[corruption] = {}
            for severity in items(cfg.severities):
                results[corruption][severity] = score(corruption, int(severity))
                logger.info(f"  {corruption} {severity}: {results[corruption][severity]:.2%}")
        return clean, results
    finally:
        if pool:
            pool.terminate()
        _views = None


def _host_batches(views, labels: np.ndarray, batch_size: int):
    """(uint8 (B, H, W, 3), labels) batches of consecutive views, the last one short."""
    chunk, first = [], 0
    for view in views:
        chunk.append(torch.from_numpy(view))
        if len(chunk) == batch_size:
            yield torch.stack(chunk), torch.from_numpy(labels[first:first + len(chunk)])
            first += len(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk), torch.from_numpy(labels[first:first + len(chunk)])


def corruption_errors(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """CE of each corruption evaluated at all five severities: its summed error over AlexNet's."""
    return {c: sum(1 - top for top in by_severity.values()) / (5 * ALEXNET_ERRORS[c])
            for c, by_severity in results.items() if sorted(by_severity) == list(SEVERITIES)}


def eval_robustness(cfg: RobustnessConfig) -> dict:
    device = resolve_device(cfg.hardware.device)
    model = load_classifier(cfg.classifier, device)
    result: dict = dict(classifier=cfg.classifier, data=cfg.data, classes=len(model.classes))
    layout = None if cfg.corrupt else imagenet_c_layout(cfg.data)
    if cfg.corrupt:
        result["clean_top1"], results = corrupted_top1(model, cfg, device)
        result.update(kind="corrupted on the fly", top1=results, seed=cfg.seed)
    elif layout is not None:
        results = {c: {s: top1(model, os.path.join(cfg.data, c, s), cfg, device, center_fraction=1.0)
                       for s in severities} for c, severities in layout.items()}
        result.update(kind="ImageNet-C", top1=results)
    else:
        result.update(kind="a labelled set",
                      top1=top1(model, cfg.data, cfg, device, center_fraction=EVAL_CROP_FRACTION))
        logger.info(f"top-1 {result['top1']:.2%} on {cfg.data} ({len(open_source(cfg.data).classes)} of the "
                    f"classifier's {len(model.classes)} classes)")
    if isinstance(result["top1"], dict):
        errors = corruption_errors(result["top1"])
        result.update(ce=errors, mce=100 * sum(errors.values()) / len(errors) if errors else None,
                      mce_corruptions=len(errors))
        logger.info(table(result))
    if cfg.json:
        write_json(cfg.json, result)
    return result


def table(result: dict) -> str:
    lines = [f"{'corruption':<18}" + "".join(f"{'s' + s:>8}" for s in SEVERITIES) + f"{'CE':>8}"]
    for corruption, by_severity in result["top1"].items():
        cells = "".join(f"{by_severity[s]:>8.1%}" if s in by_severity else f"{'-':>8}" for s in SEVERITIES)
        ce = result["ce"].get(corruption)
        lines.append(f"{corruption:<18}{cells}{'-' if ce is None else f'{100 * ce:.1f}':>8}")
    if "clean_top1" in result:
        lines.append(f"clean top-1 {result['clean_top1']:.2%}")
    lines.append("mCE: -" if result["mce"] is None else
                 f"mCE {result['mce']:.1f} over {result['mce_corruptions']} of 15 corruptions (AlexNet's is 100)")
    return "\n".join(lines)
