"""The batch every loader yields: on the training device, normalised, with its patch mask drawn there."""
from typing import Iterable, Iterator, NamedTuple

import torch

from supmae.pipelines.masking import Masking, MaskSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) normalised, in the compute dtype
    labels: torch.Tensor  # (B,) int64
    masking: Masking


def to_device_batches(host_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                      mask_sampler: MaskSampler, start: int = 0,
                      dtype: torch.dtype = torch.float32) -> Iterator[Batch]:
    """(uint8 (B, H, W, 3), labels) batches on the host -> Batch on `device`; batch i gets mask i.

    Pixels cross to the device as uint8 (a quarter of float32's bytes) and are normalised there.
    """
    device = torch.device(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    for index, (images, labels) in enumerate(host_batches, start=start):
        images = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        images = ((images - mean) / std).to(dtype).contiguous()
        yield Batch(images, labels.to(device, non_blocking=True), mask_sampler(images.shape[0], index))
