"""Captions as token ids: open_clip's CLIP tokenizer (its BPE vocabulary ships inside the package, so it runs
offline) at CLIP's context of 77, and what names a tokenizer in a .beton's sidecar, so tokens written by
one tokenizer are never read as another's."""
import functools
import hashlib
import importlib.util
import os
from typing import NamedTuple

import numpy as np

from supmae.core.errors import SupmaeError

CONTEXT = 77
TOKENIZER = "open_clip.SimpleTokenizer"
VOCABULARY = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's, as open_clip ships it
PAD = 0  # what fills a caption's row after its end marker


class Encoded(NamedTuple):
    tokens: np.ndarray   # (CONTEXT,) int32: start marker, the caption's tokens, end marker, padding
    truncated: bool      # the caption had more tokens than fit; the row ends with the end marker, as CLIP's do


@functools.cache
def tokenizer():
    """The tokenizer, built once per process (importing open_clip takes seconds: done where it is first needed,
    before any worker processes are forked)."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as error:
        raise SupmaeError(f"captions need open_clip's tokenizer (pip install open-clip-torch): {error}") from None
    return SimpleTokenizer(bpe_path=_vocabulary(), context_length=CONTEXT)


def _vocabulary() -> str:
    """The BPE vocabulary file inside open_clip's package, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SupmaeError("captions need open_clip's tokenizer: pip install open-clip-torch")
    return os.path.join(spec.submodule_search_locations[0], VOCABULARY)


@functools.cache
def identity() -> dict:
    """What a sidecar records of the tokenizer that wrote a .beton's tokens."""
    with open(_vocabulary(), "rb") as f:
        vocabulary = hashlib.sha256(f.read()).hexdigest()
    return dict(name=TOKENIZER, vocab_sha256=vocabulary, context_length=CONTEXT)


def special_tokens() -> tuple[int, int]:
    """(start, end) markers."""
    t = tokenizer()
    return t.sot_token_id, t.eot_token_id


def encode(caption: str) -> Encoded:
    t = tokenizer()
    ids = t.encode(caption)
    row = np.full(CONTEXT, PAD, np.int32)
    kept = ids[:CONTEXT - 2]
    row[0], row[1:1 + len(kept)], row[1 + len(kept)] = t.sot_token_id, kept, t.eot_token_id
    return Encoded(row, len(ids) > CONTEXT - 2)


def check_identity(recorded: dict, where: str) -> None:
    """Refuse tokens written by another tokenizer (or vocabulary, or context) than this one."""
    expected = identity()
    if recorded != expected:
        differs = next(k for k in expected if recorded.get(k) != expected[k])
        raise SupmaeError(f"{where} holds tokens of another tokenizer ({differs} {recorded.get(differs)!r}, not "
                          f"{expected[differs]!r}); convert it again")
