"""The one call an inference engine's Engram layers make: token ids in, every layer's rows out.

At forward entry the engine knows the batch's original token ids ``[B, T]`` (``-1`` marks a dead
position, e.g. an image token), so it calls :meth:`EngramFetcher.prefetch` once; each Engram
layer later calls ``wait(layer)`` for its ``[B, T, K, D]`` rows (K = orders x heads: 24 for
DeepSeek-V4.1, D = 256). In between the rows come from the store's tiers while earlier layers
compute. Compression, N-gram hashing with the pad lookback, and dead positions (they look up
no row; their rows are zeros, gate 0 for the model) are done here. Engines that hash
themselves call :meth:`EngramFetcher.prefetch_rows` with the row ids.

Rows are bfloat16 values dequantized on the store's device after the gather for a quantized
table (V4.1's packed e4m3 + UE8M0 rows), or the packed bytes ``[B, T, K, 264]`` with
``dequantize=False`` for an engine that dequantizes in its own kernel; a float table's rows are
returned as stored.

Decoding: pass the last ``max_ngram - 1`` original tokens before ``token_ids`` as ``context`` so
the new positions hash with their real lookback (without it they look back into the pad, as
at the start of a sequence).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from engram_model.compression import CompressedTokenizer
from engram_model.hashing import HashConfig, NgramHasher, fingerprint
from engram_model.memory import table_name
from engram_store.errors import EngramStoreError, FingerprintMismatchError, StoreNotFoundError


class EngramRows:
    """The rows of one :meth:`EngramFetcher.prefetch`, per Engram layer."""

    def __init__(self, handles: dict[int, object], live: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        self._handles = handles
        self._live = live  # [B, T] bool, or None when every position is live
        self._shape = shape  # (B, T, K)
        self._rows: dict[int, torch.Tensor] = {}

    @property
    def layers(self) -> list[int]:
        return sorted(self._handles)

    def done(self, layer: int) -> bool:
        return layer in self._rows or self._handles[layer].done()

    def wait(self, layer: int) -> torch.Tensor:
        """``[B, T, K, D]`` rows of Engram layer ``layer`` on the store's device; dead positions are zeros."""
        if layer not in self._rows:
            if layer not in self._handles:
                raise EngramStoreError(f"layer {layer} was not prefetched: the Engram layers are {self.layers}")
            rows = self._handles[layer].wait()  # [n_live, K, D] or [B, T, K, D]
            if self._live is not None:
                full = rows.new_zeros(*self._shape, rows.shape[-1])
                full[self._live.to(rows.device)] = rows
                rows = full
            self._rows[layer] = rows
        return self._rows[layer]


class EngramFetcher:
    """Prefetches every Engram layer's rows of a batch from one store (see the module docstring)."""

    def __init__(self, store, hash_config: HashConfig, compression: CompressedTokenizer, *,
                 dequantize: bool = True) -> None:
        fp = fingerprint(hash_config, compression.lookup)
        if store.fingerprint is not None and store.fingerprint != fp:
            raise FingerprintMismatchError(
                f"store {str(store.path)!r} was built for hash-config fingerprint {store.fingerprint!r}, the "
                f"checkpoint's tokenizer and config give {fp!r}: build the store from this checkpoint")
        self.store = store
        self.hash_config = hash_config
        self.compression = compression
        self.hasher = NgramHasher(hash_config)
        self.dequantize = dequantize
        missing = [table_name(L) for L in hash_config.layer_ids if table_name(L) not in store.tables]
        if missing:
            raise EngramStoreError(f"store {str(store.path)!r} has no table {missing}: it holds {sorted(store.tables)}")

    @classmethod
    def from_checkpoint_dir(cls, store, checkpoint, **options) -> "EngramFetcher":
        """A fetcher for a Hugging Face Engram checkpoint directory (its ``config.json`` and ``tokenizer.json``)."""
        root = Path(checkpoint)
        for f in ("config.json", "tokenizer.json"):
            if not (root / f).is_file():
                raise StoreNotFoundError(f"{root / f} not found: pass the checkpoint directory (it holds {f})")
        compression = CompressedTokenizer.from_tokenizer(Tokenizer.from_file(str(root / "tokenizer.json")))
        config = json.loads((root / "config.json").read_text())
        return cls(store, HashConfig.from_hf_config(config, compression), compression, **options)

    def _compress(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise EngramStoreError(f"token ids must be an integer tensor [B, T], got {ids.dtype} {list(ids.shape)}")
        return self.compression.compress(ids.to("cpu", torch.int64), dead_ok=True)

    def prefetch(self, token_ids: torch.Tensor, context: torch.Tensor | None = None) -> EngramRows:
        """Hash ``token_ids`` (original ids ``[B, T]``, ``-1`` = dead) and start fetching every layer's rows."""
        comp = self._compress(token_ids)
        n_ctx = 0
        if context is not None:
            ctx = self._compress(context)
            if ctx.shape[0] != comp.shape[0]:
                raise EngramStoreError(f"context has {ctx.shape[0]} sequences, token_ids {comp.shape[0]}")
            n_ctx = ctx.shape[1]
            comp = torch.cat([ctx, comp], dim=1)
        rows, live = self.hasher.row_ids_live(comp)
        rows = {L: r[:, n_ctx:] for L, r in rows.items()}
        return self.prefetch_rows(rows, live[:, n_ctx:])

    def prefetch_rows(self, row_ids: dict[int, torch.Tensor], live: torch.Tensor | None = None) -> EngramRows:
        """Start fetching ``row_ids`` (per Engram layer ``[B, T, K]`` global row ids; ``live`` [B, T] marks the
        positions to fetch, the others get zeros). Returns at once."""
        if set(row_ids) != set(self.hash_config.layer_ids):
            raise EngramStoreError(f"row ids must be given for the Engram layers {list(self.hash_config.layer_ids)}, "
                                   f"got {sorted(row_ids)}")
        shape = tuple(next(iter(row_ids.values())).shape)
        if live is not None and bool(live.all()):
            live = None
        handles = {}
        for L, r in row_ids.items():
            if tuple(r.shape) != shape:
                raise EngramStoreError(f"row ids of layer {L} have shape {list(r.shape)}, layer's {list(shape)}")
            ids = r if live is None else r[live.to(r.device)]
            handles[L] = self.store.prefetch(table_name(L), ids, dequantize=self.dequantize)
        return EngramRows(handles, live, shape)
