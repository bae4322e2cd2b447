"""The options that say where a step runs and how: declared here, without torch, for every command that
runs a model."""
import re

from supmae.core.errors import SupmaeError
from supmae.core.options import option

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# torch.compile's modes, and auto. reduce-overhead replays the step as CUDA graphs: on an H100 the
# ViT-B/16 step at batch 256 ran 1.22x faster so (benchmarks/results/), for a static copy of the inputs.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_option(group: str | None = None) -> str:
    return option("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N", metavar="DEVICE", group=group)


def check_device(device: str) -> None:
    if not _DEVICE.match(device):
        raise SupmaeError(f"--device: must be auto, cpu, cuda or cuda:N, got {device!r}")
