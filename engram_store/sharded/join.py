"""Joining a sharded store back into whole tables, streaming: :func:`join_shards`.

Each shard is read sequentially in its own rank order (``read_ranks``, checksums verified) and the
rows are put back in global row order (or in a new rank order) by the bucket permutation of
:mod:`engram_store.rank_order`: the shards laid end to end are the source, ``global_index`` of each
(shard, local row) its destination. Memory is bounded whatever the tables' size (see
:func:`join_shards`); the joined rows go into a new store (one :class:`StoreWriter`, atomic), to a
callback chunk by chunk, or, for small tables, into tensors.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from engram_store.errors import InvalidValuesError
from engram_store.ids import as_permutation
from engram_store.rank_order import DEFAULT_BUCKET_BYTES, write_in_rank_order
from engram_store.sharded.layout import check_shard_manifest, owners_of, read_layout, shard_dir_name
from engram_store.sharded.write import DEFAULT_CHUNK_BYTES, WRITE_BYTES
from engram_store.store import open as open_store
from engram_store.writer import StoreWriter

Sink = Callable[[str, int, int, torch.Tensor], None]


def join_shards(path: str | os.PathLike, out: str | os.PathLike | None = None, *, sink: Sink | None = None,
                order: Mapping | None = None, backend: str | None = None, overwrite: bool = False,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                scratch_dir: str | os.PathLike | None = None, **writer_options):
    """Every table of the sharded store at ``path`` in global row order.

    - ``out``: written as one store there (fingerprint, row formats and the layout's backend
      kept unless ``backend`` is given; ``order={name: rank -> row}`` ranks it, else rows keep
      global order); returns its path. Atomic: a partial directory renamed into place.
    - ``sink``: ``sink(name, start, stop, rows)`` is called with consecutive global row ranges
      (``rows``: ``Tensor[stop - start, dim]``, valid during the call); returns None.
    - neither: returns ``{name: Tensor[rows, dim]}`` (small tables: they are built in memory).

    Every shard's manifest is checked against ``shards.json``. Peak memory (bytes), ``rows`` the
    largest table's: ``2 * bucket_bytes`` (when the table exceeds one) + ``4 * chunk_bytes`` + ``4 * rows``
    (destination of every row) + ``16 * rows / n_shards`` (one shard's remap inversion, transient)
    + with ``out``, the writer's remap (4 per row, and ``9 * rows`` once for a given ``order``).
    Scratch disk: the table's size + 4 bytes per row, in the output's partial directory or in
    ``scratch_dir`` (default: next to ``path``), removed as each table completes.
    """
    if out is not None and sink is not None:
        raise InvalidValuesError("join_shards writes to out= or calls sink=, not both")
    root = Path(path)
    layout = read_layout(root)
    owners = owners_of(layout, str(root))
    n = int(layout["n_shards"])
    stores = []
    try:
        for i in range(n):
            d = root / shard_dir_name(i, n)
            stores.append(open_store(d, fingerprint=layout.get("fingerprint")))
            check_shard_manifest(stores[-1], layout, i, d)
        if out is not None:
            return _join_into_store(stores, layout, owners, Path(out), order, backend, overwrite, chunk_bytes,
                                    bucket_bytes, writer_options)
        if order is not None:
            raise InvalidValuesError("order= ranks the rows of an output store: pass out= too")
        scratch_parent = Path(scratch_dir) if scratch_dir is not None else root.parent
        if sink is not None:
            for name in layout["tables"]:
                _join_table(stores, name, owners[name], None, sink, scratch_parent, chunk_bytes, bucket_bytes, root.name)
            return None
        full = {}
        for name, m in layout["tables"].items():
            full[name] = torch.empty(int(m["rows"]), int(m["dim"]), dtype=stores[0].tables[name].dtype)

            def fill(tname, a, b, rows):
                full[tname][a:b] = rows

            _join_table(stores, name, owners[name], None, fill, scratch_parent, chunk_bytes, bucket_bytes, root.name)
        return full
    finally:
        for s in stores:
            s.close()


def _join_into_store(stores, layout, owners, out: Path, order, backend, overwrite, chunk_bytes, bucket_bytes,
                     writer_options) -> Path:
    order = dict(order or {})
    unknown = set(order) - set(layout["tables"])
    if unknown:
        raise InvalidValuesError(f"order names tables that are not in the sharded store: {sorted(unknown)}")
    with StoreWriter(out, backend=backend or layout.get("backend") or "mmap", fingerprint=layout.get("fingerprint"),
                     overwrite=overwrite, **writer_options) as w:
        for name, m in layout["tables"].items():
            info = stores[0].tables[name]
            rows = int(m["rows"])
            o = order.get(name)
            target = None
            if o is not None:
                o = as_permutation(o, rows, f"order[{name!r}]")
                target = np.empty(rows, dtype=np.uint32)
                target[o] = np.arange(rows, dtype=np.uint32)
            w.add_table(name, rows, info.dim, info.dtype, order=o, row_format=info.row_format)
            del o
            _join_table(stores, name, owners[name], target, lambda _n, _a, _b, r: w.write_rows(name, r),
                        w.tmp, chunk_bytes, bucket_bytes)
    return out


def _join_table(stores, name: str, owner, target: np.ndarray | None, sink: Sink, scratch_parent: Path,
                chunk_bytes: int, bucket_bytes: int, label: str = "shards") -> None:
    """Hand ``sink`` the rows of ``name`` in global order (``target`` None) or at ``target[global row]``."""
    info = stores[0].tables[name]
    n_rows = owner.rows
    rank_of = np.empty(n_rows, dtype=np.uint32)
    off = 0
    for s, st in enumerate(stores):
        k = owner.shard_rows(s)
        local_at_rank = np.empty(k, dtype=np.int64)
        local_at_rank[st.remap(name).astype(np.int64)] = np.arange(k)
        glob = owner.global_index(torch.from_numpy(local_at_rank), s).numpy()
        rank_of[off:off + k] = glob if target is None else target[glob]
        off += k
        del local_at_rank, glob
    step = max(1, int(chunk_bytes) // info.row_bytes)

    def chunks():
        for s, st in enumerate(stores):
            k = owner.shard_rows(s)
            for a in range(0, k, step):
                yield st.read_ranks(name, a, min(k, a + step)).contiguous().view(torch.uint8).numpy()

    pos = [0]

    piece = max(1, WRITE_BYTES // info.row_bytes)

    def place(buf: np.ndarray) -> None:
        for k in range(0, buf.shape[0], piece):  # small calls: a writer may copy what one call gives it
            part = buf[k:k + piece]
            a = pos[0]
            pos[0] += part.shape[0]
            sink(name, a, pos[0], torch.from_numpy(part).view(info.dtype))

    scratch = Path(scratch_parent) / f".{label}.{name}.join-{uuid.uuid4().hex[:12]}"
    write_in_rank_order(chunks(), rank_of, place, row_bytes=info.row_bytes, scratch=scratch,
                        bucket_bytes=bucket_bytes)
