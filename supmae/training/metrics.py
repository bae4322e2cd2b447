"""A run's training curve: metrics.jsonl, and TensorBoard scalars beside it."""
import json
import os

from supmae.core.atomic import write_text


def _logged_by(line: str, step: int) -> bool:
    try:
        return json.loads(line)["step"] <= step
    except ValueError:  # a blank line, or the torn tail of a write the kill cut short
        return False


class Metrics:
    """metrics.jsonl and TensorBoard scalars, written by rank 0. A resumed run first drops the lines past
    its checkpoint (a killed run may have logged steps it never saved), so the file is one clean curve."""

    def __init__(self, output: str, *, step: int, enabled: bool, tensorboard: bool):
        self.path, self.enabled = os.path.join(output, "metrics.jsonl"), enabled
        self.file = self.board = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                write_text(self.path, "".join(line for line in f if _logged_by(line, step)))
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(os.path.join(output, "tensorboard"), purge_step=step + 1)

    def write(self, record: dict) -> None:
        if self.file is None:  # not the writing rank
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self.board.add_scalar(f"train/{key}", value, record["step"])
            self.board.flush()

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc) -> None:
        for handle in (self.file, self.board):
            if handle is not None:
                handle.close()
