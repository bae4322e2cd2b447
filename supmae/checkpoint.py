"""Checkpoints that survive crashes: written to a temporary name, synced, then renamed into place.

A checkpoint is a dict whose "model" entry is a plain state dict in the official layout, so the
official code's `load_model` reads it as it reads its own.
"""
import os
import re

import torch

from supmae.errors import SupmaeError

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_path(output: str, step: int) -> str:
    return os.path.join(output, f"checkpoint-{step:08d}.pt")


def save_checkpoint(state: dict, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


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


def remove_partial_checkpoints(output: str) -> list[str]:
    """Delete what a writer killed mid-checkpoint left behind (the temporary files); returns their paths."""
    if not os.path.isdir(output):
        return []
    partial = [os.path.join(output, name) for name in os.listdir(output)
               if ".pt.tmp-" in name and _NAME.match(name.split(".tmp-")[0])]
    for path in partial:
        os.remove(path)
    return partial


def prune_checkpoints(output: str, keep: int) -> None:
    for path in list_checkpoints(output)[:-keep] if keep > 0 else []:
        os.remove(path)
