"""Finding the images of an ImageFolder-layout dataset: root/<class>/[sub/folders/]<image>."""
import os
from typing import NamedTuple

from supmae.errors import SupmaeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class ImageFolder(NamedTuple):
    root: str
    classes: list[str]               # sorted class folder names; a label is an index into this list
    samples: list[tuple[str, int]]   # (path, label), sorted by class then path


def scan_image_folder(root: str) -> ImageFolder:
    if not os.path.exists(root):
        raise SupmaeError(f"data path {root} does not exist")
    if not os.path.isdir(root):
        raise SupmaeError(f"data path {root} is not a directory (expected root/<class>/<image> folders)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise SupmaeError(f"data path {root} has no class sub-folders (expected root/<class>/<image> folders)")
    samples = []
    for label, name in enumerate(classes):
        for folder, dirs, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            samples += [(os.path.join(folder, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not samples:
        raise SupmaeError(f"data path {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFolder(root, classes, samples)
