"""One rank's view of a sharded store: global row ids in, rows out, wherever they live.

Collective semantics: **every rank must call** ``prefetch`` **for the same sequence of
tables** (with its own ids, any shape, possibly empty). A rank that dies or stops
calling makes the others raise :class:`PeerFailureError` within the process group's
timeout (``init_process_group(..., timeout=timedelta(seconds=30))``), never hang.

Threading: a ``ShardedStore`` runs its collectives on one communication thread and on a
process group of its own (``dist.new_group``), so every rank issues them in the same order
and they never interleave with the caller's collectives (DDP). Constructing and closing a
``ShardedStore`` are collective too.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
import torch.distributed as dist

from engram_store.budget import resolve_device
from engram_store.errors import (
    CollectiveOrderError, EngramStoreError, PeerFailureError, ShardLayoutError, StoreClosedError, UnknownTableError,
)
from engram_store.ids import as_id_tensor
from engram_store.sharded.exchange import DEFAULT_TIMEOUT_S, Exchange, peer_failure, table_tag
from engram_store.format import fp8_rows
from engram_store.format.rows import ROW_FORMATS
from engram_store.sharded.layout import check_shard_manifest, read_layout, shard_dir_name, table_infos
from engram_store.sharded.owner import Owner
from engram_store.sharded.row_mod_n import RowModN
from engram_store.store import open as open_store


class LocalLookup(Protocol):
    """What a rank's own shard must offer: ``lookup(table, local_ids) -> Tensor[*ids.shape, dim]``."""

    def lookup(self, table: str, row_ids: torch.Tensor, **kw) -> torch.Tensor: ...


@dataclass(frozen=True)
class ShardedTableInfo:
    rows: int  # global rows
    dim: int  # values per stored row (264 for packed fp8 rows)
    dtype: torch.dtype  # stored dtype (uint8 for packed rows)
    owner: Owner | None = None  # owner function (None: row % world size)
    row_format: str | None = None  # how uint8 rows decode (format.ROW_FORMATS), or None

    @property
    def out_dim(self) -> int:
        """Values per row as ``prefetch`` returns them by default (decoded rows for a row format)."""
        return ROW_FORMATS[self.row_format][1][1] if self.row_format else self.dim


class DenseShard:
    """A rank's shard held as dense tensors (``{name: Tensor[local_rows, dim]}``); for tests
    and small tables. Anything with ``lookup(table, local_ids)`` can stand in its place."""

    def __init__(self, tables: Mapping[str, torch.Tensor]) -> None:
        self._tables = dict(tables)

    @classmethod
    def from_full(cls, tables: Mapping[str, torch.Tensor], shard: int, n_shards: int,
                  owners: Mapping[str, Owner] | None = None) -> "DenseShard":
        """Rank ``shard``'s rows of full tables, by ``owners[name]`` (default: ``row % n_shards``)."""
        out = {}
        for name, t in tables.items():
            o = (owners or {}).get(name) or RowModN(t.shape[0], n_shards)
            out[name] = t[o.global_index(torch.arange(o.shard_rows(shard), device=t.device), shard)].contiguous()
        return cls(out)

    def lookup(self, table: str, row_ids: torch.Tensor, *, dequantize: bool = False) -> torch.Tensor:  # noqa: ARG002
        """The stored rows (a dense shard holds rows as they are: nothing to decode)."""
        return self._tables[table][row_ids]

    def close(self) -> None:
        pass


class ShardedHandle:
    """The pending result of :meth:`ShardedStore.prefetch`; same API as the store's Handle."""

    def __init__(self, future: concurrent.futures.Future, shape: tuple[int, ...], dim: int, rank: int, table: str,
                 started: float, timeout: float) -> None:
        self._future = future
        self._shape = shape
        self._dim = dim
        self._rank = rank
        self._table = table
        self._started = started
        self._timeout = timeout

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(lambda _f: fn())

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """``Tensor[*row_ids.shape, dim]`` on the store's device. Raises :class:`PeerFailureError`
        if a peer died or the exchange did not finish within ``timeout`` (default: the store's)."""
        limit = self._timeout if timeout is None else timeout
        try:
            rows = self._future.result(timeout=limit)
        except concurrent.futures.TimeoutError as exc:
            raise peer_failure(self._rank, f"prefetch({self._table!r})", TimeoutError(f"no result in {limit}s"),
                               self._started) from exc
        return rows.view(*self._shape, self._dim)


class ShardedStore:
    """One rank's view of a sharded store: ``prefetch``/``lookup`` take *global* row ids and
    return rows wherever they live. Collective: see the module docstring.

    ``local``: this rank's shard (a TieredStore from :func:`engram_store.open`, or a
    :class:`DenseShard`); ``tables``: global table shapes; ``group``: the parent process
    group (default: the world); a private group is derived from it.
    """

    def __init__(
        self,
        local: LocalLookup,
        tables: Mapping[str, ShardedTableInfo],
        *,
        group: Any = None,
        device: str | torch.device = "cpu",
        timeout: float = DEFAULT_TIMEOUT_S,
        layout_id: str | None = None,
    ) -> None:
        self.local = local
        self.tables = dict(tables)
        self.device = torch.device(device)
        self.timeout = float(timeout)
        self._own_group = None
        if dist.is_available() and dist.is_initialized():
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            backend = dist.get_backend(group)
            self._own_group = dist.new_group(ranks, timeout=timedelta(seconds=self.timeout), backend=backend)
            self._check_same_layout(layout_id)
        self._exchange = Exchange(self._own_group, device=self.device)
        self.rank, self.world_size = self._exchange.rank, self._exchange.world
        cuda_index = None
        if self.device.type == "cuda":  # the comm thread must use this rank's GPU (NCCL binds to it)
            cuda_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"engram-a2a-r{self.rank}",
            initializer=(lambda: torch.cuda.set_device(cuda_index)) if cuda_index is not None else None,
        )
        self._lock = threading.Lock()
        self._failed: BaseException | None = None
        self._closed = False

    def _check_same_layout(self, layout_id: str | None) -> None:
        mine = [layout_id, sorted((k, v.rows, v.dim, str(v.dtype), v.row_format,
                                   None if v.owner is None else v.owner.describe()) for k, v in self.tables.items())]
        gathered: list = [None] * dist.get_world_size(self._own_group)
        dist.all_gather_object(gathered, mine, group=self._own_group)
        if any(g != mine for g in gathered):
            raise ShardLayoutError(
                f"rank {dist.get_rank(self._own_group)}: ranks opened different sharded stores "
                f"({[g[0] for g in gathered]}); launch every rank on the same directory"
            )

    # -- lookups
    def prefetch(self, table: str, row_ids: torch.Tensor, *, dequantize: bool = True) -> ShardedHandle:
        """Start fetching global ``row_ids`` (any shape) of ``table``; returns at once.
        Collective: every rank must call it for the same table, in the same order.

        Rows of a row format (V4.1's packed fp8) cross the exchange packed (fewer bytes) and are
        decoded on this rank's device after it, or returned packed with ``dequantize=False``."""
        info = self._info(table)
        decode = bool(dequantize) and info.row_format is not None
        ids = as_id_tensor(row_ids, info.rows, table)
        with self._lock:
            if self._closed:
                raise StoreClosedError("prefetch on a closed ShardedStore; open it again")
            if self._failed is not None:
                raise PeerFailureError(f"rank {self.rank}: an earlier exchange failed ({self._failed}); "
                                       "the sharded store cannot be used any more, restart all ranks")
            started = time.perf_counter()
            fut = self._pool.submit(self._run, table, ids.reshape(-1), started, decode)
        return ShardedHandle(fut, tuple(ids.shape), info.out_dim if decode else info.dim, self.rank, table, started,
                             self.timeout + 5.0)

    def lookup(self, table: str, row_ids: torch.Tensor, *, dequantize: bool = True) -> torch.Tensor:
        """Synchronous :meth:`prefetch` + ``wait``."""
        return self.prefetch(table, row_ids, dequantize=dequantize).wait()

    def table(self, name: str) -> "_ShardedTableView":
        """An object with the MemoryTable protocol (rows, dim, prefetch) for EngramLM.set_memory."""
        info = self._info(name)
        return _ShardedTableView(self, name, info.rows, info.out_dim)

    def _run(self, table: str, flat: torch.Tensor, started: float, decode: bool = False) -> torch.Tensor:
        ex = self._exchange
        info = self.tables[table]
        try:
            route = ex.route(flat, table_tag(table), info.owner)
            local_ids = route.recv_local.to(self.device) if self.device.type != "cpu" else route.recv_local
            served = (self.local.lookup(table, local_ids, dequantize=False) if info.row_format is not None
                      else self.local.lookup(table, local_ids))
            rows = ex.return_rows(route, served.reshape(-1, info.dim))
        except CollectiveOrderError as exc:
            self._failed = exc
            raise
        except EngramStoreError:
            raise
        except Exception as exc:  # gloo/NCCL errors: RuntimeError, DistBackendError, DistNetworkError
            err = peer_failure(self.rank, f"prefetch({table!r}) exchange #{ex.seq}", exc, started)
            self._failed = err
            raise err from exc
        rows = rows.to(self.device)
        return fp8_rows.dequantize(rows) if decode else rows

    def _info(self, table: str) -> ShardedTableInfo:
        try:
            return self.tables[table]
        except KeyError:
            raise UnknownTableError(f"no table {table!r} in the sharded store; it has {sorted(self.tables)}") from None

    # -- bookkeeping
    def stats(self) -> dict:
        local_stats = getattr(self.local, "stats", None)
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "exchange": self._exchange.stats.as_dict(),
            "local": local_stats() if callable(local_stats) else None,
        }

    def close(self) -> None:
        """Wait for outstanding exchanges, close the local shard. Not collective, but
        a rank that closes while others still prefetch makes them fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        close = getattr(self.local, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> "ShardedStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class _ShardedTableView:
    store: ShardedStore
    name: str
    rows: int
    dim: int

    def prefetch(self, row_ids: torch.Tensor) -> ShardedHandle:
        return self.store.prefetch(self.name, row_ids)


def open_sharded(
    path: str | os.PathLike,
    *,
    group: Any = None,
    device: str = "cpu",
    hbm_bytes: int = 0,
    dram_bytes: int = 0,
    backend: str | None = None,
    fingerprint: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> ShardedStore:
    """Open this rank's shard of ``path`` (collective). The world size of ``group`` must
    equal the number of shards; ``hbm_bytes``/``dram_bytes`` are per rank."""
    device = resolve_device(device)  # DeviceError before the layout or any shard is opened
    root = Path(path)
    layout = read_layout(root)
    n = int(layout["n_shards"])
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    else:
        rank, world = 0, 1
    if world != n:
        raise ShardLayoutError(
            f"{root} was built with {n} shard(s) but {world} rank(s) opened it; launch with "
            f"`torchrun --nproc_per_node {n} ...` or rebuild with `engram-store build --shards {world}`"
        )
    d = root / shard_dir_name(rank, n)
    local = open_store(d, device=device, hbm_bytes=hbm_bytes, dram_bytes=dram_bytes, backend=backend,
                              fingerprint=fingerprint if fingerprint is not None else layout.get("fingerprint"))
    try:
        check_shard_manifest(local, layout, rank, d)
        tables = table_infos(layout)
        return ShardedStore(local, tables, group=group, device=device, timeout=timeout, layout_id=layout["layout_id"])
    except BaseException:
        local.close()
        raise
