"""What a source lists: where each image and caption is, and reading them.

An image is a file path or a member of a tar shard (read in place, at its offset: nothing is extracted); a
caption is literal text (a file list's column), a `.txt` file beside its image, or a shard member.
"""
from collections.abc import Sequence
from typing import NamedTuple


class Member(NamedTuple):
    """A file inside an uncompressed tar shard, by where its bytes lie."""
    shard: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.shard} ends inside {self.name}")
        return data

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


class TextFile(NamedTuple):
    """A caption kept in its own file, beside its image."""
    path: str


Location = str | Member               # an image
CaptionSource = str | TextFile | Member  # a caption


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")  # of image files


class LabelledImages(NamedTuple):
    root: str                                  # the folder, list file or shard pattern they were found from
    classes: list[str]                         # a label is an index into this list
    samples: list[tuple[Location, int]]        # (image, label)
    ignored: tuple[str, ...] = ()              # other files found beside them (not an image file name)
    captions: Sequence[CaptionSource] | None = None  # one per sample, for image-text data
    problems: tuple[tuple[str, str], ...] = ()  # (what, why) of what was left out while listing


class CaptionError(ValueError):
    """A caption that cannot be used: not UTF-8, or empty."""


def image_input(location: Location):
    """What PIL opens: the path itself, or the member's bytes."""
    return location.read() if isinstance(location, Member) else location


def read_caption(source: CaptionSource) -> str:
    """The caption's text, stripped; CaptionError when it is not UTF-8 or holds nothing."""
    if isinstance(source, str):
        text = source
    else:
        try:
            if isinstance(source, Member):
                data = source.read()
            else:
                with open(source.path, "rb") as f:
                    data = f.read()
        except OSError as error:
            raise CaptionError(f"caption cannot be read: {error}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CaptionError(f"caption is not UTF-8 text ({error.reason} at byte {error.start})") from None
    text = text.strip()
    if not text:
        raise CaptionError("empty caption")
    return text


def unlabelled() -> list[str]:
    """The classes of image-text data without labels: one."""
    return ["unlabelled"]
