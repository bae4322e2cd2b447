"""Run configuration files: a TOML (or YAML) table of option = value, laid over the defaults (and a resumed
run's checkpoint) and under the typed options; its keys are the options' names.

    # vitb.toml
    model = "supmae_vit_base_patch16"
    batch-size = 256
    epochs = 400
    compile = true
"""
import os

from supmae.core.errors import SupmaeError


def read_table(path: str) -> dict:
    if not os.path.isfile(path):
        raise SupmaeError(f"config file {path} does not exist")
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            with open(path) as f:
                table = yaml.safe_load(f) or {}
        else:
            import tomllib
            with open(path, "rb") as f:
                table = tomllib.load(f)
    except ImportError:
        raise SupmaeError(f"reading {path} needs PyYAML (pip install pyyaml), or write it as TOML") from None
    except Exception as error:  # each format has its own error types
        raise SupmaeError(f"config file {path} cannot be parsed: {str(error).splitlines()[0]}") from None
    if not isinstance(table, dict):
        raise SupmaeError(f"config file {path} must hold a table of option = value")
    return table
