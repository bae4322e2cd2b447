"""Run configuration files: a TOML (or YAML) table of option = value, read as if its options had been
typed before the command line's own, so the command line overrides the file and every value passes
the same checks a typed one does. A resumed run's checkpoint supplies the options neither sets.

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
    """The command-line words that set what the file at `path` sets, leaving out any option group the
    typed words already decide (a file's `epochs` yields to a typed --steps)."""
    return _option_words(parser, read_table(path), typed, f"config file {path}", strict=True)


def resumed_words(parser: argparse.ArgumentParser, resume: str, output: str, typed: list[str]) -> list[str]:
    """A resumed run is the run it continues: the words that set every option the checkpoint's run set,
    except those `typed` (including a config file's) decides. None for `--resume auto` with no checkpoint."""
    from supmae.checkpoint import latest_checkpoint, load_checkpoint
    found = latest_checkpoint(output, mmap=True) if resume == "auto" else (resume, load_checkpoint(resume, mmap=True))
    if found is None:
        return []
    path, state = found
    # Where the run is read from and written to is this invocation's business, as is its progress bar.
    saved = {k: v for k, v in state.get("config", {}).items() if k not in ("resume", "output", "progress")}
    return _option_words(parser, saved, typed, f"checkpoint {path}", strict=False)


def _option_words(parser, table: dict, typed: list[str], where: str, strict: bool) -> list[str]:
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
    for key, value in table.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            if strict:
                raise SupmaeError(f"{where}: unknown option {key!r}")
            continue  # an option a checkpoint's older version had
        if dest in decided or value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise SupmaeError(f"{where}: {key} must be true or false, got {value!r}")
            words.append(action.option_strings[0 if value else 1])
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise SupmaeError(f"{where}: {key} must be true or false, got {value!r}")
            if value != action.default:
                words.append(action.option_strings[0])
        else:
            words += [action.option_strings[0], str(value)]
    return words
