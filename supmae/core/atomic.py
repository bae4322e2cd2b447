"""Files that appear whole or not at all: written under a temporary name beside the target, synced, then
renamed over it, so a crash, a full disk or a kill mid-write leaves the previous version intact."""
import contextlib
import glob
import json
import os
import shutil
from collections.abc import Iterator

from supmae.core.errors import SupmaeError


def _sync_folder(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


def temporary_name(path: str) -> str:
    """Where `replaced` writes `path` first: hidden, beside it, unique to this process."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.partial-{os.getpid()}")


@contextlib.contextmanager
def replaced(path: str) -> Iterator[str]:
    """Yields a temporary path to write `path`'s new contents to (a file or a folder); on leaving without
    an error it is synced and renamed to `path`, and on an error it is removed."""
    tmp = temporary_name(path)
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def check_space(folder: str, needed: int, what: str) -> None:
    """Refuse, in one line, to write `what` (about `needed` bytes) into `folder` without the room for it."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SupmaeError(f"{folder} has {free / 2**20:.0f} MiB free; {what} needs about {needed / 2**20:.0f} MiB")


def leftovers(path: str) -> list[str]:
    """What writers of `path` killed mid-write left behind (only safe to remove while holding its lock)."""
    folder, name = os.path.split(os.path.abspath(path))
    return sorted(glob.glob(os.path.join(folder, f".{glob.escape(name)}.partial-*")))


def write_text(path: str, text: str) -> None:
    with replaced(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, report: dict) -> None:
    """`report` as indented JSON at `path`, written whole, its folder made if need be."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, json.dumps(report, indent=2) + "\n")
