"""supmae: fast pretraining of Vision Transformers with Supervised Masked Autoencoders.

The layers, each importing only those below it (checked by import-linter, `pyproject.toml`):

    cli                      the command line
    profiling | evaluation   how fast a run goes | what a pretrained encoder is worth
    training                 the run, the step, the loop, checkpoints
    runtime | models         device, precision, ranks | the masked trunk, its objectives, the fast path
    kernels | pipelines      Triton fast paths | files -> batches with masks on the device
    core                     errors, declared options, files written whole, locks

`pipelines` and `kernels` sit at the top of the checkout, linked into this package. The names below load
on first use, so `import supmae` (and the CLI's argument checking) does not import torch.
"""
import importlib

__version__ = "0.1.0"
_EXPORTS = {"MaskedAutoencoderViT": "supmae.models.mae", "Output": "supmae.models.mae",
            "SupmaeError": "supmae.core.errors", "create_model": "supmae.models.registry",
            "list_models": "supmae.models.families", "model_config": "supmae.models.families"}
__all__ = list(_EXPORTS)  # pyright: ignore[reportUnsupportedDunderAll]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'supmae' has no attribute {name!r}")
