"""Import the Engram tables of a Hugging Face V4.1-style checkpoint into a store, out of core.

Rows are stored as the checkpoint's own packed bytes (``engram_store.format.fp8_rows``: 256 e4m3
values + 8 UE8M0 scales = 264 bytes), in frequency-rank order when counts are given, in
checkpoint order otherwise. A table can be far larger than RAM (V4.1: 2 x 94 GiB), so the
rank permutation is a two-pass **bucket permutation** through scratch files on the output's
disk:

1. *scatter*: read the table sequentially in chunks; each row goes, tagged with its rank, to
   the bucket file of its rank range (bucket ``b`` holds ranks ``[b*R, (b+1)*R)``);
2. *gather*: for each bucket in rank order, read its file, place every row at ``rank - b*R``
   in one bucket buffer, append the buffer to the store, delete the file.

Why this method: both passes read and write sequentially (large appends, one file per
bucket), which is what disks and page caches do best; an external merge sort would move
every byte ``log(n/R)`` times, and placing rows by random writes into the final file costs a
page write per 264-byte row. Every byte is moved twice (read + write in each pass), so the
limit is half a plain sequential copy of the same bytes.

Peak memory (bytes): ``8 * rows`` of the largest table (its order and rank arrays, int32 each)
+ the writer's remap of every table (4 per row, int32 while rows < 2**31) + the permutation
check's transient ``9 * rows`` (an int64 copy and a bool mask, once, in the writer) +
``bucket_bytes`` (one bucket buffer, 1 GiB by default) + ``2 * chunk_rows * 268`` (one read
chunk and its tagged copy). Scratch disk: about the table's size plus 1.5%.

Atomic like every build: the store is written through ``StoreWriter`` (a partial directory
renamed into place), and the scratch directory is removed on success and on failure.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import torch

from engram_pipeline.counts import Counts
from engram_pipeline.hf_checkpoint import HFCheckpoint, open_hf_checkpoint
from engram_store.errors import EngramStoreError
from engram_store.format.fp8_rows import FORMAT_NAME, ROW_BYTES
from engram_store.rank_order import passes, write_in_rank_order
from engram_store.writer import StoreWriter

DEFAULT_BUCKET_BYTES = 1 << 30
DEFAULT_CHUNK_ROWS = 1 << 18  # 66 MiB of packed rows per sequential read
_WRITE_ROWS = 1 << 17  # rows per StoreWriter.write_rows call (33 MiB)


def import_hf_checkpoint(checkpoint, out, *, counts: Counts | None = None, backend: str = "mmap",
                         overwrite: bool = False, tier_plan: dict | None = None,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                         progress: bool = True) -> Path:
    """Write the Engram tables of the V4.1-style checkpoint directory ``checkpoint`` as a store at ``out``.

    ``counts`` (made with this checkpoint, see ``engram-store count``) puts each table in
    frequency-rank order; without them rows keep checkpoint order. Returns the store's path.
    """
    if bucket_bytes < ROW_BYTES or chunk_rows < 1:
        raise EngramStoreError(f"bucket_bytes must be >= {ROW_BYTES} and chunk_rows >= 1, "
                               f"got {bucket_bytes} and {chunk_rows}")
    with open_hf_checkpoint(checkpoint) as ckpt:
        if counts is not None:
            counts.check_fingerprint(ckpt.fingerprint, f"checkpoint {checkpoint}")
            for name, t in ckpt.tables.items():
                have = counts.tables.get(name)
                if have is None or have.size != t.rows:
                    raise EngramStoreError(
                        f"counts hold {None if have is None else have.size} rows for table {name!r}, the checkpoint "
                        f"{t.rows}: count the corpus again with this checkpoint")
        out = Path(out)
        with StoreWriter(out, backend=backend, fingerprint=ckpt.fingerprint, tier_plan=tier_plan,
                         overwrite=overwrite) as w:
            for name, t in ckpt.tables.items():
                order = None if counts is None else counts.order(name)
                w.add_table(name, t.rows, ROW_BYTES, torch.uint8, order=order, row_format=FORMAT_NAME)
                if order is None:
                    _copy_in_order(ckpt, w, name, chunk_rows, progress)
                else:
                    _permute(ckpt, w, name, order, out.parent, bucket_bytes, chunk_rows, progress)
                del order
    return out


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if progress else True)


def _copy_in_order(ckpt: HFCheckpoint, w: StoreWriter, name: str, chunk_rows: int, progress: bool) -> None:
    rows = ckpt.tables[name].rows
    with _bar(rows * ROW_BYTES, f"import {name}", progress) as bar:
        for chunk in ckpt.iter_rows(name, chunk_rows=chunk_rows):
            w.write_rows(name, chunk)
            bar.update(chunk.numel())


def _permute(ckpt: HFCheckpoint, w: StoreWriter, name: str, order: np.ndarray, scratch_parent: Path,
             bucket_bytes: int, chunk_rows: int, progress: bool) -> None:
    """Write table ``name`` to ``w`` in rank order (``order[rank] = row``) by the two-pass bucket permutation
    (:func:`engram_store.rank_order.write_in_rank_order`)."""
    rows = ckpt.tables[name].rows
    if rows >= 2**32:
        raise EngramStoreError(f"table {name!r} has {rows} rows: ranks beyond 2**32 are not supported")
    rank_of = np.empty(rows, dtype=np.uint32)
    rank_of[order] = np.arange(rows, dtype=np.uint32)
    scratch = scratch_parent / f".{w.path.name}.{name}.import-{uuid.uuid4().hex[:12]}"  # swept with w's partials
    total = passes(rows, ROW_BYTES, bucket_bytes) * rows * ROW_BYTES
    with _bar(total, f"import {name}", progress) as bar:
        write_in_rank_order((c.numpy() for c in ckpt.iter_rows(name, chunk_rows=chunk_rows)), rank_of,
                            lambda buf: _write(w, name, buf), row_bytes=ROW_BYTES, scratch=scratch,
                            bucket_bytes=bucket_bytes, progress=bar.update)


def _write(w: StoreWriter, name: str, rows: np.ndarray) -> None:
    for s in range(0, rows.shape[0], _WRITE_ROWS):
        w.write_rows(name, torch.from_numpy(rows[s:s + _WRITE_ROWS]))
