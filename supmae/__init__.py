"""supmae: fast pretraining of Vision Transformers with Supervised Masked Autoencoders."""
import os as _os

# Installed, pipelines/ and kernels/ live inside this package (see pyproject.toml). In a source
# checkout they sit beside it, so let `supmae.pipelines` and `supmae.kernels` resolve there too:
# the code then runs straight from a clone with nothing installed.
if not _os.path.isdir(_os.path.join(__path__[0], "pipelines")):
    __path__.append(_os.path.dirname(__path__[0]))

from supmae.errors import SupmaeError  # noqa: E402
from supmae.model import MaskedAutoencoderViT, Output  # noqa: E402
from supmae.registry import create_model, list_models, model_config  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MaskedAutoencoderViT", "Output", "SupmaeError", "create_model", "list_models", "model_config"]
