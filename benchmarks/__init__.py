"""Measurements that print measured figures: each module runs as `python -m benchmarks.<name>`, and
`python -m benchmarks.suite` runs them all (the GPU check). Published figures' JSON is in results/."""
import os
import sys
from collections.abc import Callable

from supmae.core.atomic import write_json
from supmae.core.errors import SupmaeError
from supmae.core.options import Config, from_command_line


def main(cls: type[Config], measure: Callable, describe: Callable[[dict], str] | None = None, *,
         errors: tuple[type[Exception], ...] = ()) -> None:
    """A benchmark's command line: its options, the measurement, `describe`'s summary on stdout and the report
    at --json. A SupmaeError, or one of the `errors` it expects (no GPU, say), is one line and exit status 1."""
    cfg = from_command_line(cls)
    try:
        report = measure(cfg)
    except (SupmaeError, *errors) as error:
        sys.exit(f"{os.path.splitext(os.path.basename(sys.argv[0]))[0]}: error: {error}")
    if describe is not None:
        print(describe(report))
    path = cfg.values().get("json")
    if path:
        write_json(path, report)
