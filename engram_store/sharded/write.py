"""Building a sharded store, streaming: :func:`write_shards`.

Rows are read range by range from a source (:mod:`.sources`) in global row order and written
through one :class:`engram_store.StoreWriter` per shard, all opened at once inside ONE partial
directory (:class:`engram_store.format.PartialDir`) that is committed with ``shards.json`` in one
step: after a crash the path holds the whole old sharded store or the whole new one, and a dead
build's partial directory (scratch files included) is swept by the next write to the same path.

Rank order. ``order[name][rank] = row`` (frequency order, as for :func:`engram_store.write`): each
shard keeps the rows it owns in that relative order. Every owner function keeps a shard's rows
in increasing global order, so without ``order`` the source streams straight into the shards. With
``order`` the rows must be permuted; the shards are laid end to end (shard 0's local ranks, then
shard 1's, ...) and one bucket permutation (:func:`engram_store.rank_order.write_in_rank_order`)
puts the source's rows in that combined order, cut at shard boundaries into the writers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from engram_store.errors import InvalidValuesError, StoreExistsError
from engram_store.format import MANIFEST, PartialDir
from engram_store.ids import as_permutation
from engram_store.rank_order import DEFAULT_BUCKET_BYTES, write_in_rank_order
from engram_store.sharded.layout import (
    LAYOUT_FILE, OWNER_FUNCTION, _check_n, _shard_info, _write_json, layout_json, make_owner, shard_dir_name,
)
from engram_store.sharded.owner import Owner
from engram_store.sharded.sources import RowSource, TableSpec, as_source
from engram_store.writer import StoreWriter

DEFAULT_CHUNK_BYTES = 64 << 20
WRITE_BYTES = 32 << 20  # bytes per StoreWriter.write_rows call out of a bucket


def write_shards(
    out_dir: str | os.PathLike,
    tables,
    order: Mapping | None = None,
    n_shards: int = 1,
    *,
    owner: str = OWNER_FUNCTION,
    head_rows: Mapping[str, list[int]] | None = None,
    backend: str = "mmap",
    fingerprint: str | None = None,
    tier_plan: dict | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    progress=None,
    **writer_options,
) -> Path:
    """Write ``out_dir/shard-{i}-of-{n}/`` (one normal store per rank) and ``out_dir/shards.json``.

    ``tables``: ``{name: Tensor[rows, dim]}`` in global row order, or any :class:`RowSource`
    (``specs`` + ``read(name, start, stop)``: a checkpoint, a store, a generator). ``order[name]``:
    rank -> row id, optional per table. ``owner``: ``"row_mod_n"`` (default) or ``"head_ranges"``,
    which needs ``head_rows={name: [rows of each hash head]}`` (sum = the table's rows).
    ``tier_plan`` goes to every shard with a ``"shard"`` entry added (index, count, owner function,
    layout id, global rows, and per table the rows and heads the shard owns). ``progress(nbytes)``
    is called as rows move. ``writer_options`` go to every :class:`StoreWriter`.

    Peak memory (bytes), ``rows`` the largest table's and ``C = chunk_bytes``: the source's read
    (``C``, and what the source itself buffers: ``HFCheckpoint.iter_rows`` ``2 C``) and without
    ``order`` nothing more than the writers' remap arrays (``4 * rows`` in all). With ``order``:
    the bucket permutation (:mod:`engram_store.rank_order`: ``2 * bucket_bytes`` in its gather
    pass, a bucket buffer and one bucket file read back, when the table exceeds one bucket; about
    ``4 C`` in its scatter pass) + ``12 * rows`` (the combined rank of every row, uint32; every
    shard's local order, int32 below 2**31 rows, until its writer holds it; the writers' remaps) +
    ``9 * rows / n_shards`` (one writer's permutation check) + the caller's ``order``. Scratch disk
    with ``order``: the table's size + 4 bytes per row, inside the partial directory.
    Atomic: on error the partial directory is removed and an existing ``out_dir`` is intact.
    """
    _check_n(n_shards)
    n = int(n_shards)
    out = Path(out_dir)
    source = as_source(tables)
    if out.exists() and not overwrite:
        raise StoreExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out.exists() and not (out.is_dir() and ((out / LAYOUT_FILE).is_file() or (out / MANIFEST).is_file()
                                               or not any(out.iterdir()))):
        raise StoreExistsError(f"{out} exists and is not a store: refusing to replace it")
    order = dict(order or {})
    unknown = set(order) - set(source.specs)
    if unknown:
        raise InvalidValuesError(f"order names tables that are not written: {sorted(unknown)}")
    unknown = set(head_rows or {}) - set(source.specs)
    if unknown:
        raise InvalidValuesError(f"head_rows names tables that are not written: {sorted(unknown)}")
    owners = {name: make_owner(owner, s.rows, n, (head_rows or {}).get(name), name)
              for name, s in source.specs.items()}
    layout_id = uuid.uuid4().hex
    tick = progress or (lambda _n: None)
    with PartialDir(out) as part:
        writers = []
        try:
            for i in range(n):
                plan = dict(tier_plan or {})
                plan["shard"] = _shard_info(i, n, layout_id, owners)
                writers.append(StoreWriter(part.path / shard_dir_name(i, n), backend=backend,
                                           fingerprint=fingerprint, tier_plan=plan, **writer_options))
            for name, spec in source.specs.items():
                _write_table(source, name, spec, owners[name], order.get(name), writers, part.path,
                             chunk_bytes, bucket_bytes, tick)
            for w in writers:
                w.commit()  # seals the shard into part.path/shard-i-of-n (inside the one partial dir)
        except BaseException:
            for w in writers:
                if not w._done:
                    w.abort()
            raise
        _write_json(part.path / LAYOUT_FILE, layout_json(n, layout_id, backend, fingerprint, source.specs, owners))
        part.commit()  # fsyncs every file and directory, swaps in over an existing out_dir
    return out


def _chunk_rows(spec: TableSpec, chunk_bytes: int) -> int:
    return max(1, int(chunk_bytes) // spec.row_bytes)


def _read(source: RowSource, name: str, spec: TableSpec, start: int, stop: int) -> torch.Tensor:
    rows = source.read(name, start, stop)
    if not isinstance(rows, torch.Tensor) or rows.dtype != spec.dtype or tuple(rows.shape) != (stop - start, spec.dim):
        got = f"{tuple(rows.shape)} {rows.dtype}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise InvalidValuesError(f"the source gave {got} for rows {start}..{stop} of table {name!r}, expected "
                                 f"({stop - start}, {spec.dim}) {spec.dtype}")
    return rows


def _write_table(source: RowSource, name: str, spec: TableSpec, owner: Owner, order, writers: list[StoreWriter],
                 scratch_parent: Path, chunk_bytes: int, bucket_bytes: int, tick) -> None:
    n = owner.n_shards
    step = _chunk_rows(spec, chunk_bytes)
    if order is None:
        for i, w in enumerate(writers):
            w.add_table(name, owner.shard_rows(i), spec.dim, spec.dtype, row_format=spec.row_format)
        for a in range(0, spec.rows, step):
            b = min(spec.rows, a + step)
            rows = _read(source, name, spec, a, b)
            own = owner.owner_of(torch.arange(a, b))
            for i in range(n):
                mine = rows[own == i]
                if mine.shape[0]:
                    writers[i].write_rows(name, mine)
            tick(rows.numel() * rows.element_size())
        return
    o = _as_index_array(order, spec.rows, name)
    rank_of, local_orders = _combined_ranks(o, owner)
    del o
    for i, w in enumerate(writers):
        w.add_table(name, owner.shard_rows(i), spec.dim, spec.dtype, order=local_orders[i], row_format=spec.row_format)
        local_orders[i] = None  # the writer holds its remap now
    ends = np.cumsum([owner.shard_rows(i) for i in range(n)])
    write_rows = _chunk_rows(spec, WRITE_BYTES)
    pos = [0]  # next combined rank the sink receives

    def sink(buf: np.ndarray) -> None:
        k = 0
        while k < buf.shape[0]:
            i = int(np.searchsorted(ends, pos[0], side="right"))
            take = min(buf.shape[0] - k, int(ends[i]) - pos[0])
            for a in range(k, k + take, write_rows):  # small calls: a writer may copy what one call gives it
                b = min(k + take, a + write_rows)
                writers[i].write_rows(name, torch.from_numpy(buf[a:b]).view(spec.dtype))
            k += take
            pos[0] += take

    def chunks():
        for a in range(0, spec.rows, step):
            rows = _read(source, name, spec, a, min(spec.rows, a + step))
            yield rows.contiguous().view(torch.uint8).numpy()

    scratch = scratch_parent / f".{name}.permute-{uuid.uuid4().hex[:12]}"
    write_in_rank_order(chunks(), rank_of, sink, row_bytes=spec.row_bytes, scratch=scratch,
                        bucket_bytes=bucket_bytes, progress=tick)


def _as_index_array(order, rows: int, name: str) -> np.ndarray:
    """``order`` checked to be a permutation, kept in its own integer dtype (an int32 order from counts
    is not widened: 4 bytes per row saved on a V4.1 table)."""
    o = order.detach().cpu().numpy() if isinstance(order, torch.Tensor) else np.asarray(order)
    as_permutation(o, rows, f"order[{name!r}]")  # raises for anything but a permutation of 0..rows-1
    return o


def _combined_ranks(order: np.ndarray, owner: Owner, chunk: int = 1 << 22) -> tuple[np.ndarray, list[np.ndarray]]:
    """(rank_of, local_orders) for the shards laid end to end.

    ``rank_of[row]`` = ``start[s] + j`` where ``s`` owns ``row`` and ``row`` is the ``j``-th of
    ``s``'s rows in ``order``; ``local_orders[s][j]`` = its local index. Chunked over ``order``:
    memory is the two outputs (uint32, and int32 below 2**31 rows) plus one chunk.
    """
    n, rows = owner.n_shards, order.size
    counts = [owner.shard_rows(s) for s in range(n)]
    cursor = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    local_dtype = np.int32 if rows < 2**31 else np.int64
    local_orders = [np.empty(c, dtype=local_dtype) for c in counts]
    filled = [0] * n
    rank_of = np.empty(rows, dtype=np.uint32)
    for a in range(0, rows, chunk):
        part = torch.from_numpy(order[a:a + chunk].astype(np.int64))
        own = owner.owner_of(part).numpy()
        loc = owner.local_index(part).numpy()
        for s in range(n):
            m = own == s
            k = int(m.sum())
            if not k:
                continue
            rank_of[part.numpy()[m]] = np.arange(cursor[s], cursor[s] + k, dtype=np.uint32)
            local_orders[s][filled[s]:filled[s] + k] = loc[m]
            cursor[s] += k
            filled[s] += k
    return rank_of, local_orders
