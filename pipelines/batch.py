"""The batch every loader yields: on the training device, normalised, with its patch mask drawn there."""
import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch

from supmae.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
from supmae.pipelines.masking import Masking, MaskSampler, TextMaskSampler
from supmae.pipelines.resolution import ResolutionSchedule


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) normalised, in the compute dtype
    labels: torch.Tensor  # (B,) int64
    masking: Masking | None
    tokens: torch.Tensor | None = None     # (B, 77) int64 caption token ids, when the loader reads text
    text_mask: torch.Tensor | None = None  # (B, 77) bool: the tokens a masked-text objective hides


# A per-batch augmentation on the device: (images, the batch's index) -> images, drawn from the index alone.
BatchAugment = Callable[[torch.Tensor, int], torch.Tensor]


def to_device_batches(pixel_batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device,
                      mask_sampler: MaskSampler | None, *, start: int = 0, dtype: torch.dtype = torch.float32,
                      text_mask_sampler: TextMaskSampler | None = None, augment: BatchAugment | None = None,
                      erase: BatchAugment | None = None,
                      resolution: ResolutionSchedule | None = None) -> Iterator[Batch]:
    """(uint8 (B, H, W, 3), labels[, tokens]) batches, on the host or already on `device` -> Batch; batch i gets
    mask i (none without a sampler: evaluation), and text mask i when it has tokens and a text mask sampler.
    Floating-point images are taken as already normalised (B, 3, H, W). `augment` changes uint8 (B, 3, H, W)
    pixels before normalisation (RandAugment), `erase` the normalised images (random erasing). Under a
    `resolution` schedule, each mask is drawn over its batch's own patch grid.

    Pixels cross to the device as uint8 (a quarter of float32's bytes) and are normalised there. On a GPU,
    a host batch's copy, normalisation and mask run on a side stream, so they overlap the step that is
    still running on the main stream when the next batch is asked for.
    """
    device = torch.device(device)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    scale, shift = 1 / std, -torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255 / std
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))  # scale and shift are made on the main stream
    for index, (images, labels, *text) in enumerate(pixel_batches, start=start):
        stream = side if side is not None and images.device.type == "cpu" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if images.is_floating_point():
                images = images.to(device, dtype, non_blocking=True)
            else:
                # Transposed while still uint8 (a quarter of the bytes), then scaled in place: three passes, not six.
                images = images.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
                if augment is not None:
                    images = augment(images, index)
                images = images.to(torch.float32).mul_(scale).add_(shift).to(dtype)
            if erase is not None:
                images = erase(images, index)
            # Engines recycle their output buffers, so labels are copied even when already in place.
            patches = resolution.patches(images.shape[-1]) if resolution is not None else None
            masking = mask_sampler(images.shape[0], index, patches) if mask_sampler is not None else None
            tokens = text[0].to(device, torch.int64, non_blocking=True, copy=True) if text else None
            text_mask = text_mask_sampler(tokens, index) if tokens is not None and text_mask_sampler else None
            batch = Batch(images, labels.to(device, non_blocking=True, copy=True), masking, tokens, text_mask)
        if stream is not None:
            main = torch.cuda.current_stream(device)
            main.wait_stream(stream)
            for tensor in (batch.images, batch.labels, *(batch.masking or ()),
                           *(t for t in (batch.tokens, batch.text_mask) if t is not None)):
                tensor.record_stream(main)  # made on the side stream, freed after the main stream's use
        yield batch
