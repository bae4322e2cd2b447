"""Checkpoints that survive crashes (written whole or not at all, `supmae.core.atomic`), and the options a
resumed run takes from the one it continues.

A checkpoint is a dict whose "model" entry is a plain state dict in the official layout, so the
official code's `load_model` reads it as it reads its own.
"""
import os
import re
import zipfile

import torch

from supmae.core.atomic import check_space, replaced
from supmae.core.errors import SupmaeError
from supmae.pipelines.split import Split
from supmae.training.config import PretrainConfig
from supmae.training.elastic import Groups

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_PARTIAL = re.compile(r"^\.checkpoint-\d+\.pt\.partial-\d+$")


def checkpoint_path(output: str, step: int) -> str:
    return os.path.join(output, f"checkpoint-{step:08d}.pt")


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About what a checkpoint of `model` takes: its weights and AdamW's two moments of each."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def save_checkpoint(state: dict, path: str, *, expected_bytes: int = 0) -> None:
    """Write `state` to `path` whole or not at all; a full disk is one line naming the folder and the room
    needed, and the previous checkpoint stays."""
    folder = os.path.dirname(os.path.abspath(path))
    check_space(folder, expected_bytes, "a checkpoint")
    try:
        with replaced(path) as tmp:
            torch.save(state, tmp)
    except (RuntimeError, OSError) as error:  # torch reports a short write as RuntimeError ("unexpected pos")
        check_space(folder, expected_bytes, "a checkpoint")
        raise SupmaeError(f"cannot write checkpoint {path}: {str(error).splitlines()[0]}") from None


def list_checkpoints(output: str) -> list[str]:
    """Checkpoints in `output`, oldest step first."""
    if not os.path.isdir(output):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output) if (m := _NAME.match(name))]
    return [os.path.join(output, name) for _, name in sorted(found)]


def load_checkpoint(path: str, mmap: bool = False) -> dict:
    """Loads onto the CPU: RNG states must stay there, and load_state_dict moves the rest. mmap: tensors
    are read only when touched (to look at a checkpoint's config)."""
    if not os.path.isfile(path):
        raise SupmaeError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.load's own complaint would advise unsafe loading
        raise SupmaeError(f"checkpoint {path} cannot be read: it is not a file torch.save writes, or it is cut short")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for a damaged file
        raise SupmaeError(f"checkpoint {path} cannot be read: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise SupmaeError(f"{path} is not a supmae checkpoint")
    return state


def latest_checkpoint(output: str, mmap: bool = False) -> tuple[str, dict] | None:
    """The newest checkpoint in `output` that loads, skipping damaged ones."""
    for path in reversed(list_checkpoints(output)):
        try:
            return path, load_checkpoint(path, mmap)
        except SupmaeError:
            continue
    return None


def saved_config(state: dict) -> PretrainConfig:
    """The configuration a checkpoint was trained with (options added since take their defaults, options
    since removed are left out), less the files it read: a checkpoint is evaluated, or resumed with its
    data given, where those need not exist."""
    saved = PretrainConfig.fields_of(state.get("config", {}), "checkpoint", strict=False)
    return PretrainConfig.build({k: v for k, v in saved.items() if k not in ("data", "resume")})


def saved_split(state: dict, *, classifies: bool, contrastive: bool) -> tuple[Split, Groups]:
    """The split a checkpoint's run last trained with, and the groups its losses keep whole (for a checkpoint
    from before runs recorded them, as its options and rank count made them)."""
    if "split" in state:
        return Split(**state["split"]), Groups(**state["groups"])
    config = saved_config(state)
    split = Split(config.batch_size, state.get("world_size", 1), config.accum_iter or 1)
    return split, Groups.first(split, classifies=classifies, contrastive=contrastive, sync_bn=config.sync_bn)


def resumed_options(cfg: PretrainConfig) -> dict:
    """What a resumed run takes from the checkpoint it continues: every option that run set, except where
    it is read from and written to and whether it shows progress, which are this invocation's business.
    Empty when `cfg` resumes nothing, or `--resume auto` finds no checkpoint yet."""
    if not cfg.resume:
        return {}
    found = latest_checkpoint(cfg.output, mmap=True) if cfg.resume == "auto" else \
        (cfg.resume, load_checkpoint(cfg.resume, mmap=True))
    if found is None:
        return {}
    path, state = found
    saved = PretrainConfig.fields_of(state.get("config", {}), f"checkpoint {path}", strict=False)
    return {k: v for k, v in saved.items() if k not in ("resume", "output", "progress") and v is not None}


def remove_partial_checkpoints(output: str) -> list[str]:
    """Delete what a writer killed mid-checkpoint left behind (the temporary files); returns their paths."""
    if not os.path.isdir(output):
        return []
    partial = [os.path.join(output, name) for name in os.listdir(output) if _PARTIAL.match(name)]
    for path in partial:
        os.remove(path)
    return partial


def prune_checkpoints(output: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints that load; older ones go. One that does not load (a truncated copy,
    say) is not counted, so a damaged newer file never costs the good one before it."""
    loadable = 0
    for path in reversed(list_checkpoints(output)):
        if loadable >= keep:
            os.remove(path)
            continue
        try:
            load_checkpoint(path, mmap=True)
        except SupmaeError:
            continue
        loadable += 1
