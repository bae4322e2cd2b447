"""How soon the CLI answers: the CPU time of `supmae --help` and of a run refused for a missing data path,
as ratios to the CPU time of `python -c "import torch"`, all measured in one run.

    python -m benchmarks.cli_startup --repeats 5

Each command runs as its own process, `repeats` times in turn with the others; its figure is the median
CPU time (user + system, children included) of those runs.
"""
import os
import resource
import statistics
import subprocess
import sys

if not __package__:  # run as a file, not with -m: the checkout's root holds benchmarks and supmae
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import main
from supmae.core.options import Config, configuration, option
from supmae.profiling.measure import commit, device_name, versions

COMMANDS = {
    "import torch": ["-c", "import torch"],
    "supmae --help": ["-m", "supmae", "--help"],
    "supmae pretrain --data MISSING": ["-m", "supmae", "pretrain", "--data", "/no/such/data", "--no-progress"],
}


@configuration
class StartupBenchmark(Config):
    """CPU time of the CLI's quick answers against importing torch."""
    repeats: int = option(5, "runs of each command; the figure is their median", at_least=1)
    json: str | None = option(None, "write the results here", metavar="FILE")


def cpu_seconds(arguments: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, *arguments], capture_output=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def benchmark_startup(cfg: StartupBenchmark) -> dict:
    seconds = {name: [] for name in COMMANDS}
    for _ in range(cfg.repeats):  # interleaved, so a busy moment of the machine falls on all of them
        for name, arguments in COMMANDS.items():
            seconds[name].append(cpu_seconds(arguments))
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    torch_s = medians["import torch"]
    return dict(device=device_name("cpu"), commit=commit(), versions=versions(), repeats=cfg.repeats,
                cpu_seconds=seconds, median_cpu_seconds=medians,
                vs_import_torch={name: s / torch_s for name, s in medians.items() if name != "import torch"})


def describe(report: dict) -> str:
    lines = []
    for name, seconds in report["median_cpu_seconds"].items():
        ratio = report["vs_import_torch"].get(name)
        lines.append(f"{name:<32} {seconds:6.2f} s CPU" + (f"  {ratio:.2f}x import torch" if ratio else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main(StartupBenchmark, benchmark_startup, describe)
