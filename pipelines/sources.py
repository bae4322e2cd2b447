"""Where the images of a run come from: an image folder, a CSV/TSV file list, tar shards, or a converted .beton.

Every source is a labelled, indexable set of encoded images, with a caption per image for image-text data.
Engines ask it for a sample's encoded bytes (which they decode themselves) or for decoded RGB pixels (the
PIL path), and for its caption's tokens; a .beton serves every engine, so all three can be compared on one
file.
"""
import csv
import hashlib
import json
import logging
import os
import re

import numpy as np
from PIL import Image

from supmae.core.errors import SupmaeError
from supmae.pipelines.decode import load_rgb, upright_size
from supmae.pipelines.samples import (
    IMAGE_EXTENSIONS,
    LabelledImages,
    Member,
    TextFile,
    image_input,
    read_caption,
    unlabelled,
)
from supmae.pipelines.shards import is_shards, scan_shards
from supmae.pipelines.text import CONTEXT, check_identity, encode, tokenizer
from supmae.pipelines.torch_threads import keep_torch_threads

logger = logging.getLogger(__name__)
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits: "²" is a digit to str.isdigit, not to int()
MAX_CLASSES = 1_000_000  # a label past this is a typo, not a class (ImageNet-21k has 21,843)
LIST_EXTENSIONS = (".csv", ".tsv")


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
    samples, captions, ignored, problems = _sidecar_captions(samples, ignored)
    if not samples:
        raise SupmaeError(f"data path {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        logger.warning(f"{root}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])}"
                       f"{' and more' if len(empty) > 5 else ''} hold{'' if len(empty) > 1 else 's'} no images; "
                       "each stays a class with no samples")
    return LabelledImages(root, classes, samples, tuple(ignored), captions, problems)


def _sidecar_captions(samples: list, others: list):
    """Captions in `IMAGE-STEM.txt` files beside the images: where at least half the images have one, the
    folder is image-text data and every image needs one (a few stray .txt files leave it images alone).
    Returns (samples, captions or None, files that are neither, problems)."""
    texts = {os.path.splitext(p)[0]: p for p in others if p.lower().endswith(".txt")}
    stems = {os.path.splitext(path)[0] for path, _ in samples}
    paired = len(texts.keys() & stems)
    if 2 * paired < len(samples):
        if paired:
            logger.warning(f"{paired} of {len(samples)} images have a .txt file beside them: too few to be captions, "
                           "so the images are read alone")
        return samples, None, others, ()
    problems = [(path, "caption without an image") for stem, path in texts.items() if stem not in stems]
    problems += [(path, "image without a caption") for path, _ in samples if os.path.splitext(path)[0] not in texts]
    kept = [(path, label) for path, label in samples if os.path.splitext(path)[0] in texts]
    captions = [TextFile(texts[os.path.splitext(path)[0]]) for path, _ in kept]
    return kept, captions, [p for p in others if p not in set(texts.values())], tuple(problems)


def _rows(numbers: list[int], limit: int = 3) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    more = f" and {len(numbers) - limit} more" if len(numbers) > limit else ""
    return f"row{'s' if len(numbers) > 1 else ''} {shown}{more}"


_COLUMNS = {"path": "path", "file": "path", "filename": "path", "image": "path", "label": "label",
            "class": "label", "caption": "caption", "text": "caption"}


def _list_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, {"path", "label"?, "caption"?}) per row. A first row naming its columns (path, label,
    caption, in any order and any of their synonyms) is a header; without one, rows are path,label."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
            rows = [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as error:
        raise SupmaeError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    except csv.Error as error:
        raise SupmaeError(f"{path} is not a readable file list: {error}") from None
    named = [_COLUMNS.get(cell.strip().lower()) for cell in rows[0][1]] if rows else []
    if rows and all(named) and len(set(named)) == len(named) and "path" in named and len(named) > 1:
        columns, rows = [name for name in named if name], rows[1:]
    else:
        columns = ["path", "label"]
    for number, row in rows:
        if len(row) != len(columns) or not row[columns.index("path")].strip():
            raise SupmaeError(f"{path}: row {number} is {row!r}, expected {len(columns)} columns: {','.join(columns)}")
    if not rows:
        raise SupmaeError(f"file list {path} lists no images")
    return [(number, dict(zip(columns, row))) for number, row in rows]


def _label_indices(path: str, numbers: list[int], names: list[str]) -> tuple[list[str], list[int]]:
    """(classes, each row's index). Labels that are all integers are class indices and keep their values;
    otherwise they are class names, sorted into indices."""
    empty = [n for n, name in zip(numbers, names) if not name]
    if empty:
        raise SupmaeError(f"{path}: {_rows(empty)} without a label")
    integer = [_INTEGER.fullmatch(name) is not None for name in names]
    if any(integer) and not all(integer):
        first_number = next(n for n, i in zip(numbers, integer) if i)
        first_name = next(n for n, i in zip(numbers, integer) if not i)
        raise SupmaeError(f"{path}: labels mix integers (row {first_number}) and names (row {first_name}); use one "
                          "kind")
    if not all(integer):
        classes = sorted(set(names))
        index = {name: i for i, name in enumerate(classes)}
        return classes, [index[name] for name in names]
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
    return [str(i) for i in range(top + 1)], indices


def read_file_list(path: str) -> LabelledImages:
    """A CSV (or, for .tsv, tab-separated) list of images: `path,label` rows, or columns a header row names
    (path plus label and/or caption; a UTF-8 byte-order mark is allowed). Relative paths are taken from the
    list's folder; a list without labels is image-text data of one class.

    Labels that are all integers are class indices and keep their values, so lists of a train and a val split
    agree whatever labels each holds; otherwise they are class names, sorted into indices. Empty, negative
    or mixed labels, a path listed with two labels, and indices no dataset reaches are refused naming their
    rows; repeated rows are dropped with a warning. Row numbers count the file's lines from 1."""
    if not os.path.isfile(path):
        raise SupmaeError(f"file list {path} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    rows = _list_rows(path)
    numbers = [number for number, _ in rows]
    if "label" in rows[0][1]:
        classes, indices = _label_indices(path, numbers, [row["label"].strip() for _, row in rows])
    else:
        classes, indices = unlabelled(), [0] * len(rows)
    samples, captions, seen, repeated = [], [], {}, []
    for (number, row), label in zip(rows, indices):
        file = row["path"].strip()
        full = os.path.normpath(os.path.join(base, file))
        if full in seen:
            first, first_label = seen[full]
            if first_label != label:
                raise SupmaeError(f"{path}: {file} is listed with two labels (rows {first} and {number})")
            repeated.append(number)
            continue
        seen[full] = number, label
        samples.append((full, label))
        captions.append(row.get("caption"))
    if repeated:
        logger.warning(f"{path}: {len(repeated)} repeated row{'s' if len(repeated) > 1 else ''} left out "
                       f"({_rows(repeated)})")
    return LabelledImages(path, classes, samples, captions=captions if "caption" in rows[0][1] else None)


def scan_images(path: str) -> LabelledImages:
    """An image folder, a file list or tar shards."""
    if path.lower().endswith(LIST_EXTENSIONS):
        return read_file_list(path)
    if is_shards(path):
        return scan_shards(path)
    return scan_image_folder(path)


class FolderSource:
    """Images as files (from a folder or a list) or shard members, decoded on demand; captions tokenized on
    demand too (in the loader's workers)."""

    def __init__(self, images: LabelledImages):
        self.path, self.classes = images.root, images.classes
        self.paths = [p for p, _ in images.samples]
        self.labels = np.array([y for _, y in images.samples], dtype=np.int64)
        self.captions = images.captions
        self.captioned = images.captions is not None
        if images.problems:
            logger.warning(f"{self.path}: {len(images.problems)} left out, first {images.problems[0][0]}: "
                           f"{images.problems[0][1]} (supmae convert lists them all)")

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """What the samples are, wherever the folder lies: their paths below it and their labels."""
        base = self.path if os.path.isdir(self.path) else os.path.dirname(os.path.abspath(self.path))
        digest = hashlib.sha256(self.labels.tobytes())
        for path in self.paths:
            name = path.name if isinstance(path, Member) else os.path.relpath(path, base)
            digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def encoded(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The image's bytes and its upright (width, height)."""
        path = self.paths[index]
        data = np.frombuffer(path.read(), np.uint8) if isinstance(path, Member) else np.fromfile(path, np.uint8)
        return data, upright_size(data)

    def image(self, index: int) -> Image.Image:
        return load_rgb(image_input(self.paths[index]))

    def caption(self, index: int) -> str:
        if self.captions is None:
            raise SupmaeError(f"{self.path} holds no captions")
        return read_caption(self.captions[index])

    def prepare_text(self) -> None:
        """Before loader workers fork: build the tokenizer once, here, not in each of them."""
        tokenizer()

    def tokens(self, index: int) -> np.ndarray:
        return encode(self.caption(index)).tokens


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
        # Image-text data also holds each caption's tokens and its text (convert writes both or neither).
        self.captioned = {"tokens", "text"} <= set(field)
        if self.captioned:
            self._token_ptrs = np.array(reader.metadata[field["tokens"]])
            self._text = np.array(reader.metadata[field["text"]])  # ptr, size per sample
        self.sidecar = self._read_sidecar()
        self.classes = list(self.sidecar["class_to_index"]) if "class_to_index" in self.sidecar else \
            [str(i) for i in range(int(self.labels.max(initial=-1)) + 1)]  # no sidecar: the labels name themselves
        self.tokenizer = self.sidecar.get("tokenizer")  # what wrote the tokens (text.identity)
        if len(self.labels) and self.labels.max() >= len(self.classes):
            raise SupmaeError(f"{path}'s sidecar {sidecar_path(path)} names {len(self.classes)} classes but its labels "
                              f"reach {self.labels.max()}: the sidecar is stale; convert again")
        stored = [self._image["data_ptr"], *((self._token_ptrs, self._text["ptr"]) if self.captioned else ())]
        if not all(np.isin(ptrs, self._ptrs).all() for ptrs in stored):
            raise SupmaeError(f"{path} is cut short: samples are missing from its allocation table; convert again")
        self._file = None

    def _read_sidecar(self) -> dict:
        try:
            with open(sidecar_path(self.path)) as f:
                sidecar = json.load(f)
        except (OSError, ValueError):  # none: a .beton written by other means
            return {}
        return sidecar if isinstance(sidecar, dict) else {}

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

    def _map(self) -> np.ndarray:
        if self._file is None:
            self._file = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._file

    def _stored(self, index: int) -> tuple[np.ndarray, bool, int, int]:
        file = self._map()
        mode, width, height, ptr = self._image[index]
        size = self._sizes[np.searchsorted(self._ptrs, ptr)]
        return file[ptr:ptr + size], mode == _JPEG, int(width), int(height)

    def encoded(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """JPEG bytes as stored; raw pixels are wrapped as a binary PPM, which every decoder reads losslessly."""
        data, is_jpeg, width, height = self._stored(index)
        if not is_jpeg:
            data = np.concatenate([np.frombuffer(f"P6\n{width} {height}\n255\n".encode(), np.uint8), data])
        return np.asarray(data), (width, height)

    def image(self, index: int) -> Image.Image:
        data, is_jpeg, width, height = self._stored(index)
        if is_jpeg:
            return load_rgb(data.data)
        return Image.frombuffer("RGB", (width, height), np.ascontiguousarray(data), "raw", "RGB", 0, 1)

    def prepare_text(self) -> None:
        """Tokens written by another tokenizer than this run's are refused (no tokenizer runs here otherwise)."""
        check_identity(self.tokenizer or {}, f"{self.path} (by its sidecar {sidecar_path(self.path)})")

    def tokens(self, index: int) -> np.ndarray:
        """As stored: no tokenizer runs while training on a .beton."""
        ptr = int(self._token_ptrs[index])
        return self._map()[ptr:ptr + CONTEXT * 4].view(np.int32).copy()

    def caption(self, index: int) -> str:
        ptr, size = (int(v) for v in self._text[index])
        return bytes(self._map()[ptr:ptr + size]).decode("utf-8")


def open_source(path: str):
    """The source at `path`: a .beton file, a CSV/TSV file list, tar shards or an image folder."""
    if path.lower().endswith(".beton"):
        return BetonSource(path)
    return FolderSource(scan_images(path))
