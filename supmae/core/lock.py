"""One writer per output: an advisory lock on a file beside it, naming its holder, so a second run on the
same folder (or a second conversion to the same file) is refused in one line instead of interleaving its
files with the first's. The lock dies with the process that holds it: a killed run leaves nothing to undo."""
import contextlib
import fcntl
import os
from collections.abc import Iterator

from supmae.core.errors import SupmaeError


@contextlib.contextmanager
def exclusive(lock_path: str, what: str) -> Iterator[None]:
    """Hold `lock_path` while the block runs; SupmaeError naming the holder when another process has it."""
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise SupmaeError(f"{what} is in use by process {holder}: wait for it to finish, or choose another") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
