"""Run configuration files: a TOML (or YAML) table of option = value, read as if its options had been
typed before the command line's own, so the command line overrides the file and every value passes
the same checks a typed one does.

    # vitb.toml
    model = "supmae_vit_base_patch16"
    batch-size = 256
    epochs = 400
    compile = true
"""
import argparse
import os

from supmae.errors import SupmaeError


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


def config_words(parser: argparse.ArgumentParser, path: str, typed: list[str]) -> list[str]:
    """The command-line words that set what `path` sets, leaving out any option group the typed words
    already decide (a file's `epochs` yields to a typed --steps)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    by_option = {option: a for a in actions.values() for option in a.option_strings}
    decided = set()
    for word in typed:
        action = by_option.get(word.split("=", 1)[0])
        if action is not None:
            decided.add(action.dest)
            for group in parser._mutually_exclusive_groups:
                if action in group._group_actions:
                    decided.update(a.dest for a in group._group_actions)
    words = []
    for key, value in read_table(path).items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise SupmaeError(f"config file {path}: unknown option {key!r}")
        if dest in decided or value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise SupmaeError(f"config file {path}: {key} must be true or false, got {value!r}")
            words.append(action.option_strings[0 if value else 1])
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise SupmaeError(f"config file {path}: {key} must be true or false, got {value!r}")
            if value != action.default:
                words.append(action.option_strings[0])
        else:
            words += [action.option_strings[0], str(value)]
    return words
