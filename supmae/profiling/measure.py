"""How supmae measures throughput: timed windows after a warm-up, utilisation alongside, and where the
figures came from (device, versions, commit). `supmae profile` and every benchmark use these.
"""
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def commit() -> str:
    """The checkout's commit, with "+dirty" when its tracked files differ from it: such figures did not
    come from that commit alone. Results written by the benchmarks do not count: a second benchmark run
    after a first rewrote its JSON measured the same code."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results")
        return (head + ("+dirty" if dirty else "")) if head else "unknown"
    except OSError:
        return "unknown"


def versions(*packages: str) -> dict:
    found: dict[str, str | None] = dict(python=platform.python_version(), torch=torch.__version__)
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def _cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds spent by `process`, its live descendants and the children it has reaped. A worker that
    exits inside a window is counted through its reaped parent's `children_*` times, so nothing is counted
    twice and nothing is lost."""
    seconds = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.Error:  # a worker that has just exited: its parent counts it once reaped
            continue
        seconds += times.user + times.system + times.children_user + times.children_system
    return seconds


class Usage:
    """CPU used by this process and its loader workers and by the whole machine, their resident memory, and
    the GPU's utilisation and peak memory, over one measured interval. The run's own CPU share is what says
    whether its workers are starved; the machine's says whether other processes are taking the cores."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.process = psutil.Process()
        self.rss_peak = 0
        self.gpu_utilization = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        psutil.cpu_percent(percpu=True)  # opens the machine's CPU window
        self.began, self.cpu_seconds = time.perf_counter(), _cpu_seconds(self.process)

    def sample(self) -> None:
        rss = 0
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
            except psutil.Error:  # a worker that has just exited
                pass
        self.rss_peak = max(self.rss_peak, rss)
        if self.device.type == "cuda":
            try:
                self.gpu_utilization.append(torch.cuda.utilization(self.device))
            except Exception:  # NVML (pynvml) is optional
                pass

    def finish(self) -> dict:
        per_core = psutil.cpu_percent(percpu=True)
        seconds = time.perf_counter() - self.began
        own = (_cpu_seconds(self.process) - self.cpu_seconds) / (seconds * len(per_core))
        figures: dict[str, Any] = dict(cpu_percent=100 * own, machine_cpu_percent=sum(per_core) / len(per_core),
                       cpu_percent_per_core=per_core, rss_gib=self.rss_peak / 2**30)
        if self.device.type == "cuda":
            figures.update(
                gpu_utilization_percent=statistics.median(self.gpu_utilization) if self.gpu_utilization else None,
                gpu_memory_peak_gib=torch.cuda.max_memory_allocated(self.device) / 2**30,
                gpu_memory_total_gib=torch.cuda.get_device_properties(self.device).total_memory / 2**30)
        return figures


def flops_of(call: Callable[[], object]) -> int:
    """The FLOPs `call` performs, as PyTorch's FLOP counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured FLOP/s of an n x n x n product in `dtype`: the ceiling MFU is taken against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def measure(call: Callable[[], float | None], images_per_call: int, *, device: torch.device | str, steps: int,
            warmup: int, window: int) -> dict:
    """Time `call` over `steps` calls in windows of `window` calls, after `warmup` untimed ones
    (at least one).

    `call` may return the seconds it spent waiting for data; their share of each window is its
    data-wait fraction. The first call (start-up, compilation) and the whole warm-up are reported
    apart and never enter the images/s figures, which are per window: median, min and max.
    """
    device = torch.device(device)
    start = time.perf_counter()
    call()
    sync(device)
    first_call_s = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        call()
    sync(device)
    warmup_s = time.perf_counter() - start
    usage = Usage(device)
    windows, began = [], time.perf_counter()
    for first in range(0, steps, window):
        calls = min(window, steps - first)
        window_start, waited = time.perf_counter(), 0.0
        for _ in range(calls):
            waited += call() or 0.0
        sync(device)
        seconds = time.perf_counter() - window_start
        windows.append(dict(end_s=time.perf_counter() - began, images_per_s=calls * images_per_call / seconds,
                            data_wait_fraction=waited / seconds))
        usage.sample()
    rates = [w["images_per_s"] for w in windows]
    return dict(images_per_s=dict(median=statistics.median(rates), min=min(rates), max=max(rates)),
                data_wait_fraction=statistics.median(w["data_wait_fraction"] for w in windows),
                first_call_s=first_call_s, warmup_s=warmup_s, windows=windows, **usage.finish())
