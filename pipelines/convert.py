"""`supmae convert`: an image folder or file list -> an FFCV .beton, a JSON sidecar and a skip report.

Two passes over the files, both on every core: the first reads each file's header (and caption) to sort
out what is not an image and to size FFCV's pages; the second is FFCV's DatasetWriter, fed upright RGB,
which decodes each file once, as FFCV's own writer does. A file that fails to decode there (truncated or
corrupt past its header, or changed since the first pass) is skipped with its reason and the .beton
written again without it, so a clean folder costs one decode per image. The .beton is written under a
temporary name and renamed into place last, so an interrupted conversion never leaves a
complete-looking file.
"""
import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import shared_memory
from typing import NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from supmae.core.atomic import leftovers, replaced, write_text
from supmae.core.errors import SupmaeError
from supmae.core.lock import exclusive
from supmae.pipelines.config import ConvertConfig
from supmae.pipelines.decode import UNREADABLE, load_reduced_rgb, load_rgb, upright_size
from supmae.pipelines.samples import IMAGE_EXTENSIONS, CaptionError, image_input, read_caption
from supmae.pipelines.sources import scan_images, sidecar_path
from supmae.pipelines.text import CONTEXT, encode, identity, tokenizer
from supmae.pipelines.torch_threads import keep_torch_threads

with keep_torch_threads():
    from ffcv.fields import BytesField, IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

logger = logging.getLogger(__name__)
_MIN_PAGE, _MAX_PAGE = 1 << 23, 1 << 31


class _Writer(DatasetWriter):
    """FFCV's writer, noting in `record` the name of the shared-memory table it makes, which FFCV frees only
    when it finishes: the next conversion to the same output frees it when this one was killed first."""

    def __init__(self, *args, record: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = record

    def prepare(self):
        super().prepare()
        write_text(self.record, self.metadata_sm.name)  # pyright: ignore[reportAttributeAccessIssue]  (set by prepare)


def _free_recorded_table(record: str) -> None:
    """Free the shared memory a killed conversion's writer recorded (the caller holds the output's lock)."""
    if not os.path.exists(record):
        return
    with open(record) as f:
        name = f.read().strip()
    with contextlib.suppress(FileNotFoundError):  # FFCV, or the system, freed it already
        table = shared_memory.SharedMemory(name=name)
        table.close()
        table.unlink()
        logger.info(f"freed shared memory {name}, left by a conversion killed while writing")
    os.remove(record)


def report_path(beton: str) -> str:
    return beton + ".skipped.tsv"


def _ignore_sigint():
    # Ctrl-C is the parent's to handle; a worker that also caught it would print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Interrupts(list):
    """SIGINT and SIGTERM, remembered, and raised as KeyboardInterrupt only where it unwinds cleanly: in this
    module's code, in a wait of the checking pass, or in FFCV's writer loop, where the main thread spends its
    time. One that arrives elsewhere (inside a fork, whose handlers would only print it) is raised again a
    moment later. The writer processes FFCV forks inherit the handler: there Ctrl-C is the parent's to act
    on and SIGTERM ends the process."""

    RETRY_S = 0.02

    def __init__(self):
        super().__init__()
        self._previous, self._owner, self._raised = {}, os.getpid(), False
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if os.getpid() != self._owner:
            if signum == signal.SIGTERM:
                os._exit(1)
            return
        if signum != signal.SIGALRM:
            self.append(signum)
        if not self or self._raised:
            return
        if _unwinds_cleanly(frame):
            self._raised = True
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, self.RETRY_S)

    def restore(self):
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _unwinds_cleanly(frame) -> bool:
    code = frame.f_code
    return (code.co_filename == __file__ or (code.co_name == "wait" and code.co_filename == threading.__file__)
            or (code.co_name == "_write_common" and code.co_filename.endswith(os.path.join("ffcv", "writer.py"))))


def _check(job) -> "tuple[tuple[int, int], bool] | str":
    """((width, height), whether the caption was truncated) of a sample whose header and caption read, or why
    it is not usable."""
    location, caption = job
    try:
        size = upright_size(image_input(location))
    except UNREADABLE as error:
        return f"{type(error).__name__}: {error}"
    if caption is None:
        return size, False
    try:
        return size, encode(read_caption(caption)).truncated
    except CaptionError as error:
        return str(error)


def _tsv(text: str) -> str:
    """A TSV field: backslash, tab and line breaks escaped, so a file name holding them stays one row."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _stored_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    # As FFCV's RGBImageField resizes: scale the longest side down to max_resolution, truncating.
    if max_resolution and max(width, height) > max_resolution:
        ratio = max_resolution / max(width, height)
        return int(ratio * width), int(ratio * height)
    return width, height


class _Images:
    """The indexable dataset FFCV's writer processes read: (upright RGB pixels, label), and for image-text data
    also (caption tokens, caption text as UTF-8).

    A file that fails to decode cannot be dropped here (FFCV has already laid out one record per sample,
    and a worker that raised would hang the writer), so it is written as one black pixel and flagged; the
    .beton is then written again without it."""

    def __init__(self, samples: list, captions: "list | None", failed, max_resolution: int):
        self.samples, self.captions, self.failed = samples, captions, failed
        self.max_resolution = max_resolution

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        location, label = self.samples[index]
        np.random.seed(index)  # FFCV's proportion mode draws from numpy's global generator
        try:
            image, full = load_reduced_rgb(image_input(location), self.max_resolution)
            pixels = np.asarray(image)
            if pixels.shape[1::-1] != full:  # decoded at a DCT scale: shrunk the rest of the way as FFCV would
                pixels = cv2.resize(pixels, _stored_size(*full, self.max_resolution), interpolation=cv2.INTER_AREA)
            text = read_caption(self.captions[index]) if self.captions is not None else ""
        except (*UNREADABLE, CaptionError):
            self.failed[index] = 1
            pixels, text = np.zeros((1, 1, 3), np.uint8), ""
        if self.captions is None:
            return pixels, label
        return pixels, label, encode(text).tokens, np.frombuffer(text.encode("utf-8"), np.uint8)


def _page_size(sizes: list[tuple[int, int]], max_resolution: int) -> int:
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


def convert(cfg: ConvertConfig) -> dict:
    """Convert `cfg.src` to `cfg.out`; returns the sidecar's contents. Raises SupmaeError for bad input,
    leaving `out` as it was."""
    folder, name = os.path.split(os.path.abspath(cfg.out))
    with exclusive(os.path.join(folder, f".{name}.lock"), f"output {cfg.out}"):  # one conversion per output
        return _write(cfg)


def _write(cfg: ConvertConfig) -> dict:
    src, out = cfg.src, cfg.out
    if os.path.exists(out) and not cfg.force:
        raise SupmaeError(f"{out} already exists; pass --force to replace it")
    record = _clear_leftovers(out)
    images = scan_images(src)
    if images.captions is not None:
        tokenizer()  # built before the workers fork, so each has it (and before the clock starts)
    workers = cfg.workers or os.cpu_count() or 1
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    started = time.perf_counter()
    checked = _checked(images, workers, cfg.progress)
    report = report_path(out)
    with replaced(out) as tmp:
        while checked.samples:
            failed = _write_beton(tmp, checked, cfg.storage, workers=workers, record=record, progress=cfg.progress)
            if not failed:
                break
            logger.info(f"{len(failed)} file(s) did not decode, first {checked.samples[failed[0]][0]}; writing "
                        f"{out} again without them")
            checked = _without(checked, failed)
        rows = "path\treason\n" + "".join(f"{_tsv(p)}\t{_tsv(why)}\n" for p, why in checked.skipped) + \
            "".join(f"{_tsv(p)}\tnot an image file name ({', '.join(IMAGE_EXTENSIONS)})\n" for p in images.ignored)
        if not checked.samples:
            skipped = checked.skipped
            if os.path.exists(out):  # the report describes the .beton beside it, which stays as it was
                raise SupmaeError(f"none of the {len(images.samples)} files in {src} could be read, first "
                                  f"{_tsv(skipped[0][0])}: {skipped[0][1]}; {out} is left as it was")
            write_text(report, rows)
            raise SupmaeError(f"none of the {len(images.samples)} files in {src} could be read; reasons in "
                              f"{report}")
        seconds = time.perf_counter() - started
        sidecar = _sidecar(cfg, images, checked, seconds, report=report)
        write_text(report, rows)
        write_text(sidecar_path(out), json.dumps(sidecar, indent=2) + "\n")
    ignored = f", {len(images.ignored)} other files ignored" if images.ignored else ""
    listed = f" (listed in {report})" if checked.skipped or images.ignored else ""
    texts = (f", {len(checked.captions)} captions ({checked.truncated} cut to {CONTEXT} tokens)"
             if checked.captions is not None else "")
    logger.info(f"{len(checked.samples)} written{texts}, {len(checked.skipped)} skipped{ignored}{listed}: {out} in "
                f"{sidecar['seconds']:.1f} s, {sidecar['images_per_s']:.0f} images/s")
    return sidecar


def _clear_leftovers(out: str) -> str:
    """Remove what conversions to `out` killed mid-write left (the caller holds its lock, so none is writing
    them) and free their shared memory; returns the path where this one records its table."""
    folder, name = os.path.split(os.path.abspath(out))
    record = os.path.join(folder, f".{name}.table")
    for path in leftovers(out):
        os.remove(path)
        logger.info(f"removed {path}, left by a conversion killed while writing it")
    _free_recorded_table(record)
    return record


class _Checked(NamedTuple):
    """The first pass's verdict: what is written, and what is skipped and why."""
    samples: list                     # (location, label) of each sample written
    sizes: list                       # their upright (width, height)
    captions: "list | None"           # their captions, for image-text data
    skipped: list                     # (location, reason)
    truncated: int                    # captions cut to the context length


def _checked(images, workers: int, progress: bool) -> _Checked:
    """Every file read through on all cores, to sort out what cannot be decoded and to size FFCV's pages."""
    captions = images.captions
    jobs = list(zip([p for p, _ in images.samples], captions or [None] * len(images.samples)))
    with multiprocessing.Pool(workers, initializer=_ignore_sigint) as pool:
        checks = list(tqdm(pool.imap(_check, jobs, chunksize=16), total=len(jobs), desc="checking", unit="img",
                           disable=not progress))
    kept = _Checked(samples=[], sizes=[], captions=None if captions is None else [], skipped=[], truncated=0)
    for sample, (location, caption), result in zip(images.samples, jobs, checks):
        if isinstance(result, str):
            kept.skipped.append((str(location), result))
            continue
        kept.samples.append(sample)
        kept.sizes.append(result[0])
        if kept.captions is not None:
            kept.captions.append(caption)
    kept.skipped.extend(images.problems)
    return kept._replace(truncated=sum(not isinstance(result, str) and result[1] for result in checks))


def _without(checked: _Checked, failed: list[int]) -> _Checked:
    """`checked` less the samples at `failed`, each skipped with the reason it does not decode."""
    gone = set(failed)
    keep = [i for i in range(len(checked.samples)) if i not in gone]
    reasons = [(str(checked.samples[i][0]), _decode_error(checked.samples[i][0],
                                                            None if checked.captions is None else checked.captions[i]))
               for i in failed]
    return checked._replace(samples=[checked.samples[i] for i in keep], sizes=[checked.sizes[i] for i in keep],
                            captions=None if checked.captions is None else [checked.captions[i] for i in keep],
                            skipped=checked.skipped + reasons)


def _decode_error(location, caption) -> str:
    """Why a sample whose header read did not decode."""
    try:
        load_rgb(image_input(location))
        if caption is not None:
            read_caption(caption)
    except CaptionError as error:
        return str(error)
    except UNREADABLE as error:
        return f"{type(error).__name__}: {error}"
    return "it did not decode while the .beton was written (changed since?)"


def _write_beton(tmp: str, checked: _Checked, options, *, workers: int, record: str, progress: bool) -> list[int]:
    """FFCV's writer over the kept samples, into `tmp`; returns the indices of those that did not decode (each
    written as one black pixel). Ctrl-C or SIGTERM stops it cleanly, and on any failure its processes and
    its shared-memory table go with it."""
    samples, captions = checked.samples, checked.captions
    failed = multiprocessing.Array("b", len(samples), lock=False)
    fields = {"image": RGBImageField(write_mode=options.write_mode,
                                     max_resolution=options.max_resolution or None,  # pyright: ignore[reportArgumentType]
                                     smart_threshold=options.smart_threshold, jpeg_quality=options.jpeg_quality,
                                     compress_probability=options.compress_probability),
              "label": IntField()}
    if captions is not None:  # the tokens to train on, and the text for another tokenizer later
        fields.update(tokens=NDArrayField(np.dtype("int32"), (CONTEXT,)), text=BytesField())
    already_running = set(multiprocessing.active_children())  # not this conversion's to stop
    interrupted = _Interrupts()
    writer = None
    try:
        writer = _Writer(tmp, fields, page_size=_page_size(checked.sizes, options.max_resolution), num_workers=workers,
                         record=record)
        # FFCV draws its own progress bar on stderr; without --progress it is not shown.
        with contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO()):
            writer.from_indexed_dataset(_Images(samples, captions, failed, options.max_resolution))
        if interrupted:
            raise KeyboardInterrupt
        return [int(i) for i in np.flatnonzero(np.frombuffer(failed, np.int8))]
    except BaseException:
        for child in set(multiprocessing.active_children()) - already_running:
            child.terminate()
        shared = getattr(writer, "metadata_sm", None)
        if isinstance(shared, shared_memory.SharedMemory):  # FFCV's sample table, which it frees only when done
            with contextlib.suppress(OSError):  # it may have finished
                shared.close()
                shared.unlink()
        raise
    finally:
        interrupted.restore()
        if os.path.exists(record):
            os.remove(record)


def _sidecar(cfg: ConvertConfig, images, checked: _Checked, seconds: float, *, report: str) -> dict:
    """What the .beton holds, from what, and how it was made: the JSON beside it."""
    counts = np.bincount([y for _, y in checked.samples], minlength=len(images.classes))
    sidecar = dict(
        format="supmae-beton/1", source=os.path.abspath(cfg.src), num_samples=len(checked.samples),
        skipped=len(checked.skipped), ignored=len(images.ignored),
        class_to_index={name: i for i, name in enumerate(images.classes)},
        class_counts={name: int(n) for name, n in zip(images.classes, counts)},
        options=dataclasses.asdict(cfg.storage), report=os.path.basename(report),
        seconds=round(seconds, 3), images_per_s=round(len(checked.samples) / seconds, 1))
    if checked.captions is not None:
        sidecar.update(tokenizer=identity(), captions=dict(count=len(checked.captions), truncated=checked.truncated))
    return sidecar
