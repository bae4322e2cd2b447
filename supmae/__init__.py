"""supmae: fast pretraining of Vision Transformers with Supervised Masked Autoencoders.

The names below load on first use, so `import supmae` (and the CLI's argument checking) does not import
torch."""
import importlib
import importlib.abc
import importlib.util
import os as _os
import sys as _sys

__version__ = "0.1.0"
_EXPORTS = {"MaskedAutoencoderViT": "supmae.model", "Output": "supmae.model", "SupmaeError": "supmae.errors",
            "create_model": "supmae.registry", "list_models": "supmae.registry", "model_config": "supmae.registry"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'supmae' has no attribute {name!r}")


class _Checkout(importlib.abc.MetaPathFinder):
    """Installed, pipelines/ and kernels/ live inside this package (pyproject.toml's package-dir). In a
    source checkout they sit beside it: this finder gives exactly those two their installed names,
    `supmae.pipelines` and `supmae.kernels`, so the code runs from a clone with nothing installed."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "supmae" or name not in ("pipelines", "kernels"):
            return None
        folder = _os.path.join(self.root, name)
        return importlib.util.spec_from_file_location(fullname, _os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


if not _os.path.isdir(_os.path.join(__path__[0], "pipelines")):
    _sys.meta_path.append(_Checkout(_os.path.dirname(_os.path.abspath(__path__[0]))))
