"""webdataset tar shards, the format img2dataset writes and image-text corpora (CC3M, CC12M, LAION subsets)
ship in. A sample is the members sharing a key: `KEY.jpg|jpeg|png|webp` (the image), `KEY.txt` (its
caption), and optionally `KEY.cls` or `KEY.json` (an integer label, as `{"label": 3}`). Members are listed
by their offsets, so conversion reads them in place; nothing is extracted.

    supmae convert 'shards/{00000..00099}.tar' out.beton    # a brace pattern, a folder of .tar files,
                                                              # one .tar, or several separated by commas
"""
import json
import logging
import os
import re
import tarfile

from braceexpand import braceexpand

from supmae.core.errors import SupmaeError
from supmae.pipelines.samples import IMAGE_EXTENSIONS, LabelledImages, Member, unlabelled

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
logger = logging.getLogger(__name__)
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key: the name up to its first dot


def is_shards(spec: str) -> bool:
    """Whether `spec` names tar shards rather than an image folder or a file list: a brace pattern, .tar files,
    or a folder holding .tar files and no folder of images (a logs/ folder beside the shards is no class)."""
    if "{" in spec or all(part.strip().lower().endswith(".tar") for part in spec.split(",")):
        return True
    return os.path.isdir(spec) and any(name.endswith(".tar") for name in os.listdir(spec)) and not any(
        entry.is_dir() and _holds_images(entry.path) for entry in os.scandir(spec))


def _holds_images(folder: str) -> bool:
    return any(name.lower().endswith(IMAGE_EXTENSIONS) for _, _, names in os.walk(folder) for name in names)


def shard_paths(spec: str) -> list[str]:
    if os.path.isdir(spec):
        return sorted(os.path.join(spec, name) for name in os.listdir(spec) if name.endswith(".tar"))
    return [path for part in spec.split(",") if part.strip() for path in braceexpand(part.strip())]


def _members(shard: str, problems: list):
    """(TarInfo, Member) of each file in `shard`, to where it ends; a shard cut short or damaged is one
    problem, and the members before the damage are kept."""
    size = os.path.getsize(shard)
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    problems.append((shard, f"cut short inside {info.name}; the samples before it are kept"))
                    return
                yield tar, info, Member(shard, info.offset_data, info.size, info.name)
    except (tarfile.TarError, EOFError, OSError) as error:
        problems.append((shard, f"damaged or not an uncompressed tar ({error}); the samples before are kept"))


def _label(tar, info) -> int:
    data = tar.extractfile(info).read().decode("utf-8").strip()
    value = json.loads(data).get("label") if info.name.endswith(".json") else data
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"label {value!r} is not a class index (a non-negative integer)")


def scan_shards(spec: str) -> LabelledImages:
    """The samples of the shards `spec` names, with their captions where any sample has one, and labels where
    any has one; a sample missing what others have is left out, as one problem each."""
    problems, samples = [], {}  # (shard, key) -> {"image": Member, "caption": Member, "label": int}
    shards = shard_paths(spec)
    present = [shard for shard in shards if os.path.isfile(shard)]
    missing = [shard for shard in shards if shard not in present]
    if not present:
        raise SupmaeError(f"{spec} names {len(shards)} shard(s) and none of them exists")
    if missing:  # a pattern wider than the shards written: said now, whatever reads them
        logger.warning(f"{spec}: {len(missing)} of the {len(shards)} shards it names do not exist, first {missing[0]}")
    problems += [(shard, "no such shard") for shard in missing]
    for shard in present:
        for tar, info, member in _members(shard, problems):
            match = _KEY.match(info.name)
            if match is None:
                continue
            key, suffix = match.group(1), match.group(2).lower()
            sample = samples.setdefault((shard, key), {})
            if suffix in IMAGE_SUFFIXES:
                sample.setdefault("image", member)
            elif suffix == "txt":
                sample["caption"] = member
            elif suffix in ("cls", "json"):
                try:
                    sample["label"] = _label(tar, info)
                except (ValueError, UnicodeDecodeError, AttributeError) as error:
                    sample["bad label"] = str(error)
    captioned = any("caption" in s for s in samples.values())
    labelled = any("label" in s for s in samples.values())
    kept, captions = [], []
    for (shard, key), sample in samples.items():
        where = f"{shard}:{key}"
        if "image" not in sample:
            problems.append((where, "caption without an image" if "caption" in sample else "no image"))
        elif captioned and "caption" not in sample:
            problems.append((where, "image without a caption"))
        elif "bad label" in sample:
            problems.append((where, sample["bad label"]))
        elif labelled and "label" not in sample:
            problems.append((where, "no label, where other samples have one"))
        else:
            kept.append((sample["image"], sample.get("label", 0)))
            captions.append(sample.get("caption"))
    if not kept:
        raise SupmaeError(f"{spec} holds no usable samples ({len(problems)} problems, first: "
                          f"{problems[0][0]}: {problems[0][1]})" if problems else f"{spec} holds no samples")
    # Every label the shards hold counts, a left-out sample's too: a class stays one when its samples do not.
    highest = max(s["label"] for s in samples.values() if "label" in s) if labelled else 0
    classes = [str(i) for i in range(highest + 1)] if labelled else unlabelled()
    return LabelledImages(spec, classes, kept, captions=captions if captioned else None, problems=tuple(problems))
