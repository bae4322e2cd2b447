"""`supmae convert`: an image folder or file list -> an FFCV .beton, a JSON sidecar and a skip report.

Two passes over the files, both on every core: the first reads each file through (a JPEG at 1/8 scale,
which still reads all its data) to sort out what cannot be decoded and to size FFCV's pages; the second
is FFCV's DatasetWriter, fed upright RGB. The .beton is written under a temporary name and renamed into
place last, so an interrupted conversion never leaves a complete-looking file.
"""
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Optional
from unittest import mock

import numpy as np
from tqdm import tqdm

from supmae.errors import SupmaeError
from supmae.pipelines.decode import UNREADABLE, load_rgb, probe
from supmae.pipelines.sources import scan_images, sidecar_path
from supmae.pipelines.torch_threads import keep_torch_threads

WRITE_MODES = ("jpg", "raw", "proportion", "smart")
_MIN_PAGE, _MAX_PAGE = 1 << 23, 1 << 31


@dataclasses.dataclass
class ConvertOptions:
    write_mode: str = "jpg"               # jpg | raw | proportion (JPEG with compress_probability) | smart
    # Longest side after resizing; 0 or None keeps the original size. 320 keeps a full-image 224 crop at
    # native resolution for aspect ratios up to 4:3 (short side 240) while decoding a fraction of the
    # pixels of large originals.
    max_resolution: Optional[int] = 320
    jpeg_quality: int = 90
    compress_probability: float = 0.5     # proportion mode
    smart_threshold: int = 3 * 256 * 256  # smart mode: JPEG when the raw pixels would take more bytes


def report_path(beton: str) -> str:
    return beton + ".skipped.tsv"


def _ignore_sigint():
    # Ctrl-C is the parent's to handle; a worker that also caught it would print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Interrupts(list):
    """Turns SIGINT and SIGTERM into KeyboardInterrupt and remembers them, for the main thread's writes."""

    def __init__(self):
        super().__init__()
        self._previous, self._owner = {}, os.getpid()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        # One that lands in code whose exceptions Python ignores (a fork handler, say) is still acted on,
        # through the list; it need not be reported as well.
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = lambda u: None if u.exc_type is KeyboardInterrupt else self._unraisable(u)

    def _handle(self, signum, frame):
        if os.getpid() != self._owner:  # inherited by a writer process: Ctrl-C is the parent's, SIGTERM ends it
            if signum == signal.SIGTERM:
                os._exit(1)
            return
        self.append(signum)
        raise KeyboardInterrupt

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = self._unraisable


def _check(path: str):
    try:
        return probe(path)
    except UNREADABLE as error:
        return f"{type(error).__name__}: {error}".replace("\t", " ").replace("\n", " ")


def _stored_size(width: int, height: int, max_resolution: Optional[int]) -> tuple[int, int]:
    # As FFCV's RGBImageField resizes: scale the longest side down to max_resolution, truncating.
    if max_resolution and max(width, height) > max_resolution:
        ratio = max_resolution / max(width, height)
        return int(ratio * width), int(ratio * height)
    return width, height


class _Images:
    """The indexable dataset FFCV's writer processes read: (upright RGB pixels, label).

    A file that changed after the first pass cannot be dropped here (FFCV has already laid out one
    record per sample, and a worker that raised would hang the writer), so it is written as one black
    pixel and flagged; the conversion then fails."""

    def __init__(self, samples: list[tuple[str, int]], failed):
        self.samples, self.failed = samples, failed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        np.random.seed(index)  # FFCV's proportion mode draws from numpy's global generator
        try:
            return np.asarray(load_rgb(path)), label
        except UNREADABLE:
            self.failed[index] = 1
            return np.zeros((1, 1, 3), np.uint8), label


def _page_size(sizes: list[tuple[int, int]], max_resolution: Optional[int]) -> int:
    """The smallest power-of-two page FFCV can fit the largest sample into (a JPEG of noise can exceed
    its raw pixels a little)."""
    stored = [_stored_size(w, h, max_resolution) for w, h in sizes]
    if max(max(w, h) for w, h in stored) > 65535:  # FFCV records sides as 16-bit numbers
        raise SupmaeError("an image has a side longer than 65535 pixels; pass --max-res")
    largest = max(3 * w * h for w, h in stored)
    need = int(largest * 1.25) + (1 << 20)
    if need > _MAX_PAGE:
        raise SupmaeError(f"an image of {largest // 3} pixels is too large for a .beton; pass --max-res")
    return max(_MIN_PAGE, 1 << (need - 1).bit_length())


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def convert(src: str, out: str, options: ConvertOptions = ConvertOptions(), workers: Optional[int] = None,
            force: bool = False, progress: bool = True, log=print) -> dict:
    """Convert `src`; returns the sidecar's contents. Raises SupmaeError for bad input, leaving `out` as it was."""
    with keep_torch_threads():
        import ffcv.writer
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    _validate(options)
    if os.path.isdir(out):
        raise SupmaeError(f"output {out} is a directory; give a file name such as {out.rstrip('/')}.beton")
    if os.path.exists(out) and not force:
        raise SupmaeError(f"{out} already exists; pass --force to replace it")
    images = scan_images(src)
    workers = workers or os.cpu_count() or 1
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    started = time.perf_counter()

    with multiprocessing.Pool(workers, initializer=_ignore_sigint) as pool:
        checks = list(tqdm(pool.imap(_check, [p for p, _ in images.samples], chunksize=16),
                           total=len(images.samples), desc="checking", unit="img", disable=not progress))
    skipped = [(path, result) for (path, _), result in zip(images.samples, checks) if isinstance(result, str)]
    kept = [(sample, result) for sample, result in zip(images.samples, checks) if not isinstance(result, str)]
    report = report_path(out)
    _write_atomic(report, "path\treason\n" + "".join(f"{p}\t{why}\n" for p, why in skipped))
    if not kept:
        raise SupmaeError(f"none of the {len(images.samples)} files in {src} could be read; reasons in {report}")

    samples = [sample for sample, _ in kept]
    failed = multiprocessing.Array("b", len(samples), lock=False)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.partial-{os.getpid()}")
    fields = {"image": RGBImageField(write_mode=options.write_mode, max_resolution=options.max_resolution or None,
                                     smart_threshold=options.smart_threshold, jpeg_quality=options.jpeg_quality,
                                     compress_probability=options.compress_probability),
              "label": IntField()}
    interrupted = _Interrupts()
    try:
        writer = DatasetWriter(tmp, fields, page_size=_page_size([s for _, s in kept], options.max_resolution),
                               num_workers=workers)
        with mock.patch.object(ffcv.writer, "tqdm", functools.partial(tqdm, disable=not progress, unit="img",
                                                                      desc="writing")):
            writer.from_indexed_dataset(_Images(samples, failed))
        changed = [samples[i][0] for i in np.flatnonzero(np.frombuffer(failed, np.int8))]
        if changed:
            raise SupmaeError(f"{len(changed)} file(s) could not be read on the second pass (changed during the "
                              f"conversion?), first {changed[0]}; nothing was written to {out}")
        if interrupted:
            raise KeyboardInterrupt
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        seconds = time.perf_counter() - started
        counts = np.bincount([y for _, y in samples], minlength=len(images.classes))
        sidecar = dict(
            format="supmae-beton/1", source=os.path.abspath(src), num_samples=len(samples), skipped=len(skipped),
            class_to_index={name: i for i, name in enumerate(images.classes)},
            class_counts={name: int(n) for name, n in zip(images.classes, counts)},
            options=dataclasses.asdict(options), report=os.path.basename(report),
            seconds=round(seconds, 3), images_per_s=round(len(samples) / seconds, 1))
        _write_atomic(sidecar_path(out), json.dumps(sidecar, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        for child in multiprocessing.active_children():
            child.terminate()
        shared = getattr(locals().get("writer"), "metadata_sm", None)
        if hasattr(shared, "unlink"):  # FFCV's sample table, which it only frees when it finishes
            with contextlib.suppress(OSError):  # it may have finished
                shared.close()
                shared.unlink()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        interrupted.restore()
    log(f"{len(samples)} written, {len(skipped)} skipped{f' (reasons in {report})' if skipped else ''}: "
        f"{out} in {sidecar['seconds']:.1f} s, {sidecar['images_per_s']:.0f} images/s")
    return sidecar


def _validate(options: ConvertOptions) -> None:
    if options.write_mode not in WRITE_MODES:
        raise SupmaeError(f"unknown write mode {options.write_mode!r}; use {', '.join(WRITE_MODES)}")
    if options.max_resolution and not 8 <= options.max_resolution <= 65535:
        raise SupmaeError(f"max resolution must be between 8 and 65535 (or 0 to keep originals), got "
                          f"{options.max_resolution}")
    if not 1 <= options.jpeg_quality <= 100:
        raise SupmaeError(f"JPEG quality must be between 1 and 100, got {options.jpeg_quality}")
    if not 0 <= options.compress_probability <= 1:
        raise SupmaeError(f"compress probability must be between 0 and 1, got {options.compress_probability}")
    if options.smart_threshold < 0:
        raise SupmaeError(f"smart threshold must not be negative, got {options.smart_threshold}")
