"""Where a step runs and how: the options every command that runs a model takes (whole, or the device alone),
declared here without torch."""
import re

from supmae.core.errors import SupmaeError
from supmae.core.options import Config, configuration, option

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# torch.compile's modes, and auto. reduce-overhead replays the step as CUDA graphs: on an H100 the
# ViT-B/16 step at batch 256 ran 1.22x faster so (benchmarks/results/), for a static copy of the inputs.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
REDUCE_OVERHEAD_ACCUMULATES = ("--compile-mode reduce-overhead replays the step as CUDA graphs, whose next replay "
                               "overwrites the gradients being accumulated: use --accum-iter 1 or another "
                               "--compile-mode")


@configuration
class HardwareOptions(Config):
    """The device, and the precision and compilation of the step that runs there."""
    device: str = option("auto", "auto (a GPU when there is one), cpu, cuda or cuda:N", metavar="DEVICE",
                         group="hardware")
    precision: str = option("auto", "auto: bf16 on GPU, fp32 on CPU; fp16 uses a GradScaler", choices=PRECISIONS,
                            group="hardware")
    compile: bool | None = option(None, "torch.compile the step", group="hardware", shown="on for GPU, off for CPU")
    compile_mode: str = option("auto", "torch.compile's mode; reduce-overhead replays the step as CUDA graphs; "
                                       "auto: reduce-overhead on one GPU with --accum-iter 1, default otherwise",
                               choices=COMPILE_MODES, group="hardware")

    def check(self) -> None:
        if not _DEVICE.match(self.device):
            raise SupmaeError(f"--device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
