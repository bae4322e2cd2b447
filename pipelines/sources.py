"""Where the images of a run come from: an image folder, a CSV/TSV file list, or a converted .beton file.

Every source is a labelled, indexable set of encoded images. Engines ask it for a sample's encoded bytes
(which they decode themselves) or for decoded RGB pixels (the PIL path); a .beton serves every engine, so
all three can be compared on one file.
"""
import csv
import hashlib
import json
import logging
import os
import re
from typing import NamedTuple

import numpy as np
from PIL import Image

from supmae.errors import SupmaeError
from supmae.pipelines.decode import load_rgb, upright_size
from supmae.pipelines.torch_threads import keep_torch_threads

logger = logging.getLogger(__name__)
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits: "²" is a digit to str.isdigit, not to int()
MAX_CLASSES = 1_000_000  # a label past this is a typo, not a class (ImageNet-21k has 21,843)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
LIST_EXTENSIONS = (".csv", ".tsv")


class LabelledImages(NamedTuple):
    root: str                        # the folder or list file they were found from
    classes: list[str]               # a label is an index into this list
    samples: list[tuple[str, int]]   # (path, label)
    ignored: tuple[str, ...] = ()    # other files found beside them (not an image file name)


def _walk(top: str, visited: set[str]):
    """(folder, file names) under `top`, following links to folders but into each real folder once (a link
    back up would otherwise repeat the tree until the path grows too long), hidden folders left out."""
    real = os.path.realpath(top)
    if real in visited:
        return
    visited.add(real)
    entries = list(os.scandir(top))
    yield top, [e.name for e in entries if e.is_file()]
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            yield from _walk(entry.path, visited)


def scan_image_folder(root: str) -> LabelledImages:
    """root/<class>/[sub/folders/]<image>; classes sorted by name, samples by class then path."""
    if not os.path.exists(root):
        raise SupmaeError(f"data path {root} does not exist")
    if not os.path.isdir(root):
        raise SupmaeError(f"data path {root} is not a directory (expected root/<class>/<image> folders)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise SupmaeError(f"data path {root} has no class sub-folders (expected root/<class>/<image> folders)")
    samples, ignored, visited, empty = [], [], {os.path.realpath(root)}, []
    for label, name in enumerate(classes):
        files = [os.path.join(folder, f) for folder, names in sorted(_walk(os.path.join(root, name), visited))
                 for f in sorted(names) if not f.startswith(".")]
        found = [(path, label) for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
        ignored += [path for path in files if not path.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            empty.append(name)
        samples += found
    if not samples:
        raise SupmaeError(f"data path {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        logger.warning(f"{root}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])}"
                       f"{' and more' if len(empty) > 5 else ''} hold{'' if len(empty) > 1 else 's'} no images; "
                       "each stays a class with no samples")
    return LabelledImages(root, classes, samples, tuple(ignored))


def _rows(numbers: list[int], limit: int = 3) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return f"row{'s' if len(numbers) > 1 else ''} {shown}" + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def read_file_list(path: str) -> LabelledImages:
    """A CSV (or, for .tsv, tab-separated) list of `path,label` rows, with or without a header row (one whose
    label reads `label` or `class`; a UTF-8 byte-order mark is allowed). Relative paths are taken from the
    list's folder.

    Labels that are all integers are class indices and keep their values, so lists of a train and a val split
    agree whatever labels each holds; otherwise they are class names, sorted into indices. Empty, negative
    or mixed labels, a path listed with two labels, and indices no dataset reaches are refused naming their
    rows; repeated rows are dropped with a warning. Row numbers count the file's lines from 1."""
    if not os.path.isfile(path):
        raise SupmaeError(f"file list {path} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
            rows = [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as error:
        raise SupmaeError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    except csv.Error as error:
        raise SupmaeError(f"{path} is not a readable file list: {error}") from None
    if rows and len(rows[0][1]) == 2 and rows[0][1][1].strip().lower() in ("label", "class"):
        rows = rows[1:]
    for number, row in rows:
        if len(row) != 2 or not row[0].strip():
            raise SupmaeError(f"{path}: row {number} is {row!r}, expected two columns: path,label")
    if not rows:
        raise SupmaeError(f"file list {path} lists no images")
    numbers = [number for number, _ in rows]
    names = [label.strip() for _, (_, label) in rows]
    empty = [n for n, name in zip(numbers, names) if not name]
    if empty:
        raise SupmaeError(f"{path}: {_rows(empty)} without a label")
    integer = [_INTEGER.fullmatch(name) is not None for name in names]
    if all(integer):
        indices = [int(name) for name in names]
        negative = [n for n, y in zip(numbers, indices) if y < 0]
        if negative:
            raise SupmaeError(f"{path}: {_rows(negative)} with a negative label; integer labels are class indices "
                              "from 0")
        top = max(indices)
        if top >= MAX_CLASSES:
            rows_at = [n for n, y in zip(numbers, indices) if y == top]
            raise SupmaeError(f"{path}: {_rows(rows_at)} with label {top}, past the {MAX_CLASSES} classes any "
                              "dataset has; integer labels are class indices")
        if top + 1 > max(1000, 10 * len(set(indices))):
            logger.warning(f"{path}: labels run up to {top} with {len(set(indices))} different ones, so most of the "
                           f"{top + 1} classes are empty")
        classes = [str(i) for i in range(top + 1)]
    elif any(integer):
        first_number = next(n for n, i in zip(numbers, integer) if i)
        first_name = next(n for n, i in zip(numbers, integer) if not i)
        raise SupmaeError(f"{path}: labels mix integers (row {first_number}) and names (row {first_name}); use one "
                          "kind")
    else:
        classes = sorted(set(names))
        index = {name: i for i, name in enumerate(classes)}
        indices = [index[name] for name in names]
    samples, seen, repeated = [], {}, []
    for number, (file, _), label in zip(numbers, (row for _, row in rows), indices):
        full = os.path.normpath(os.path.join(base, file.strip()))
        if full in seen:
            first, first_label = seen[full]
            if first_label != label:
                raise SupmaeError(f"{path}: {file.strip()} is listed with two labels (rows {first} and {number})")
            repeated.append(number)
            continue
        seen[full] = number, label
        samples.append((full, label))
    if repeated:
        logger.warning(f"{path}: {len(repeated)} repeated row{'s' if len(repeated) > 1 else ''} left out "
                       f"({_rows(repeated)})")
    return LabelledImages(path, classes, samples)


def scan_images(path: str) -> LabelledImages:
    """An image folder or a file list."""
    if path.lower().endswith(LIST_EXTENSIONS):
        return read_file_list(path)
    return scan_image_folder(path)


class FolderSource:
    """Images as files (from a folder or a list), decoded on demand."""

    def __init__(self, images: LabelledImages):
        self.path, self.classes = images.root, images.classes
        self.paths = [p for p, _ in images.samples]
        self.labels = np.array([y for _, y in images.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """What the samples are, wherever the folder lies: their paths below it and their labels."""
        base = self.path if os.path.isdir(self.path) else os.path.dirname(os.path.abspath(self.path))
        digest = hashlib.sha256(self.labels.tobytes())
        for path in self.paths:
            digest.update(os.path.relpath(path, base).encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()

    def describe(self, index: int) -> str:
        return self.paths[index]

    def encoded(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The file's bytes and its upright (width, height)."""
        data = np.fromfile(self.paths[index], dtype=np.uint8)
        return data, upright_size(data)

    def image(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])


_JPEG = 0  # FFCV's RGBImageField mode for JPEG-stored samples (1: raw pixels)


def sidecar_path(beton: str) -> str:
    return beton + ".json"


def _check_whole(path: str) -> None:
    """A .beton ends with its allocation table, which a copy cut short loses first: refuse one whose file ends
    before the table begins or inside an entry, rather than fail on its first missing sample mid-run."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType
    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        return  # not a .beton at all: the reader says so
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    table = int(header["alloc_table_ptr"])
    if header["version"] == CURRENT_VERSION and (size < table or (size - table) % ALLOC_TABLE_TYPE.itemsize):
        raise SupmaeError(f"{path} is cut short: {size} bytes, where its allocation table begins at byte {table}; "
                          "convert again")


class BetonSource:
    """A .beton written by `supmae convert` (or any FFCV file with an RGB `image` and an int `label` field)."""

    def __init__(self, path: str):
        with keep_torch_threads():
            from ffcv.fields import IntField, RGBImageField
            from ffcv.reader import Reader
        if not os.path.isfile(path):
            raise SupmaeError(f"data file {path} does not exist")
        _check_whole(path)
        try:
            reader = Reader(path)
        except Exception as error:  # FFCV raises bare AssertionError/ValueError/IndexError on foreign files
            raise SupmaeError(f"{path} is not a readable .beton file ({type(error).__name__}: {error})") from None
        if not (isinstance(reader.handlers.get("image"), RGBImageField)
                and isinstance(reader.handlers.get("label"), IntField)):
            raise SupmaeError(f"{path} has fields {reader.field_names}; supmae needs an RGB 'image' and an int 'label'")
        self.path = path
        field = {name: f"f{i}" for i, name in enumerate(reader.field_names)}  # FFCV's metadata column names
        self.labels = np.array(reader.metadata[field["label"]], dtype=np.int64)
        self._image = np.array(reader.metadata[field["image"]])  # mode, width, height, data_ptr per sample
        ptrs = reader.alloc_table["ptr"]
        order = np.argsort(ptrs)
        self._ptrs, self._sizes = ptrs[order], reader.alloc_table["size"][order]
        self.classes = self._read_classes()
        if len(self.labels) and self.labels.max() >= len(self.classes):
            raise SupmaeError(f"{path}'s sidecar {sidecar_path(path)} names {len(self.classes)} classes but its labels "
                              f"reach {self.labels.max()}: the sidecar is stale; convert again")
        if not np.isin(self._image["data_ptr"], self._ptrs).all():
            raise SupmaeError(f"{path} is cut short: samples are missing from its allocation table; convert again")
        self._file = None

    def _read_classes(self) -> list[str]:
        try:
            with open(sidecar_path(self.path)) as f:
                return list(json.load(f)["class_to_index"])
        except (OSError, ValueError, KeyError):  # no sidecar: the labels name themselves
            return [str(i) for i in range(int(self.labels.max(initial=-1)) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """What the samples are: their labels and stored sizes and formats, read from the table, not the pixels."""
        table = np.stack([self._image[f].astype(np.int64) for f in ("mode", "width", "height")])
        return hashlib.sha256(self.labels.tobytes() + table.tobytes()).hexdigest()

    def __getstate__(self):
        # Worker processes map the file themselves.
        return {**self.__dict__, "_file": None}

    def describe(self, index: int) -> str:
        return f"{self.path}[{index}]"

    def _stored(self, index: int) -> tuple[np.ndarray, bool, int, int]:
        if self._file is None:
            self._file = np.memmap(self.path, dtype=np.uint8, mode="r")
        mode, width, height, ptr = self._image[index]
        size = self._sizes[np.searchsorted(self._ptrs, ptr)]
        return self._file[ptr:ptr + size], mode == _JPEG, int(width), int(height)

    def encoded(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """JPEG bytes as stored; raw pixels are wrapped as a binary PPM, which every decoder reads losslessly."""
        data, is_jpeg, width, height = self._stored(index)
        if not is_jpeg:
            data = np.concatenate([np.frombuffer(f"P6\n{width} {height}\n255\n".encode(), np.uint8), data])
        return np.asarray(data), (width, height)

    def image(self, index: int) -> Image.Image:
        data, is_jpeg, width, height = self._stored(index)
        if is_jpeg:
            return load_rgb(memoryview(data))
        return Image.frombuffer("RGB", (width, height), np.ascontiguousarray(data), "raw", "RGB", 0, 1)


def open_source(path: str):
    """The source at `path`: a .beton file, a CSV/TSV file list, or an image folder."""
    if path.lower().endswith(".beton"):
        return BetonSource(path)
    return FolderSource(scan_images(path))
