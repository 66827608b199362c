"""Tables sharded across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each of ``n`` ranks owns a partition of every table's rows, held in its own tiered store
(``out_dir/shard-{i}-of-{n}/``, a normal store). The owner function is

    owner_of(row)   = row % n          local_index(row) = row // n

Hashed N-gram row ids are spread uniformly, and a frequency-ordered table has its hot
rows at the low ids: the modulo puts consecutive (equally hot) rows on different ranks,
so every rank serves about the same share of the traffic. Contiguous ranges would give
rank 0 all the hottest rows of a frequency-ordered table. The function's name and the
shard count are recorded in ``shards.json`` and in every shard's manifest (tier plan,
key ``"shard"``); opening with a different function or rank count raises
:class:`ShardLayoutError`.

A lookup (:meth:`ShardedStore.prefetch`) is three ``all_to_all_single`` collectives, run
on one communication thread per store so that every rank issues them in the same order:

1. a header ``[W, 3]`` int64: per destination the number of ids, a table tag and a
   sequence number (a rank that calls prefetch for another table, or skipped a call,
   is detected here and every rank raises :class:`CollectiveOrderError`);
2. the (deduplicated) ids, with split sizes from the header;
3. the rows, as raw bytes (``uint8`` views, so the result is bit-for-bit the owner's
   row whatever the dtype), back along the reverse splits.

Collective semantics: **every rank must call** ``prefetch`` **for the same sequence of
tables** (with its own ids, any shape, possibly empty). A rank that dies or stops
calling makes the others raise :class:`PeerFailureError` within the process group's
timeout (``init_process_group(..., timeout=timedelta(seconds=30))``), never hang.

Threading: a ``ShardedStore`` runs its collectives on a process group of its own
(``dist.new_group``), so they never interleave with the caller's collectives (DDP).
Constructing and closing a ``ShardedStore`` are collective too.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.distributed as dist

from engram_store.errors import (
    EngramStoreError,
    InvalidRowIdsError,
    StoreClosedError,
    StoreCorruptError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownTableError,
)
from engram_store.format import fsync_path
from engram_store.ids import as_id_tensor
from engram_store.prefetch.handle import Ready

OWNER_FUNCTION = "row_mod_n"  # owner = row % n, local index = row // n
LAYOUT_FILE = "shards.json"
LAYOUT_FORMAT = "engram-store-shards"
LAYOUT_VERSION = 1
DEFAULT_TIMEOUT_S = 30.0


class ShardLayoutError(EngramStoreError):
    """Shards built for another rank count or owner function, or ranks that opened different builds."""


class PeerFailureError(EngramStoreError, RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or the group broke."""


class CollectiveOrderError(PeerFailureError):
    """Ranks issued collectives for different tables (or a different number of them)."""


# ----------------------------------------------------------------------------- owner function


def owner_of(row_ids: torch.Tensor, n_shards: int) -> torch.Tensor:
    """Rank owning each global row id: ``row % n_shards`` (same shape as ``row_ids``)."""
    _check_n(n_shards)
    return torch.remainder(row_ids, n_shards)


def local_index(row_ids: torch.Tensor, n_shards: int) -> torch.Tensor:
    """Row index inside the owner's shard: ``row // n_shards``."""
    _check_n(n_shards)
    return torch.div(row_ids, n_shards, rounding_mode="floor")


def global_index(local_ids: torch.Tensor, shard: int, n_shards: int) -> torch.Tensor:
    """Inverse of (owner_of, local_index): ``local * n_shards + shard``."""
    return local_ids * n_shards + shard


def shard_rows(rows: int, shard: int, n_shards: int) -> int:
    """Number of rows of a ``rows``-row table that shard ``shard`` owns."""
    _check_n(n_shards)
    return max(0, (rows - shard + n_shards - 1) // n_shards)


def shard_dir_name(shard: int, n_shards: int) -> str:
    return f"shard-{shard}-of-{n_shards}"


def _check_n(n_shards: int) -> None:
    if int(n_shards) < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")


def _shard_info(shard: int, n_shards: int, layout_id: str, global_rows: Mapping[str, int]) -> dict:
    return {
        "index": shard,
        "n_shards": n_shards,
        "owner": OWNER_FUNCTION,
        "layout_id": layout_id,
        "global_rows": dict(global_rows),
    }


# ----------------------------------------------------------------------------- build / join


def write_shards(
    out_dir: str | os.PathLike,
    tables: Mapping[str, torch.Tensor],
    order: Mapping[str, torch.Tensor] | None = None,
    n_shards: int = 1,
    *,
    backend: str = "mmap",
    fingerprint: str | None = None,
    tier_plan: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/shard-{i}-of-{n}/`` (one normal store per rank) and ``out_dir/shards.json``.

    ``tables[name]``: ``Tensor[rows, dim]`` in global row order. ``order[name][rank] = row``
    (frequency order, as for :func:`engram_store.write`); each shard keeps the rows it
    owns in the same relative order. ``tier_plan`` is passed to every shard with a
    ``"shard"`` entry added (index, count, owner function, layout id, global rows).
    Atomic: everything is written under a temporary sibling directory that is renamed
    into place; on error nothing is left behind and an existing ``out_dir`` is intact.
    """
    import engram_store  # the core package; imported here so the plumbing works without it

    _check_n(n_shards)
    n_shards = int(n_shards)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise StoreExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    for name, t in tables.items():
        if t.dim() != 2:
            raise ValueError(f"table {name!r} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    layout_id = uuid.uuid4().hex
    global_rows = {name: int(t.shape[0]) for name, t in tables.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{layout_id[:8]}"
    try:
        tmp.mkdir()
        for i in range(n_shards):
            local_tables = {name: t[i::n_shards].contiguous() for name, t in tables.items()}
            local_order = None
            if order is not None:
                local_order = {}
                for name in tables:
                    o = order.get(name)
                    if o is None:
                        continue
                    o = torch.as_tensor(o, dtype=torch.int64)
                    if o.shape != (global_rows[name],):
                        raise ValueError(f"order[{name!r}] must have shape ({global_rows[name]},), got {tuple(o.shape)}")
                    mine = o[owner_of(o, n_shards) == i]
                    local_order[name] = local_index(mine, n_shards)
            plan = dict(tier_plan or {})
            plan["shard"] = _shard_info(i, n_shards, layout_id, global_rows)
            engram_store.write(
                tmp / shard_dir_name(i, n_shards),
                local_tables,
                local_order,
                backend=backend,
                fingerprint=fingerprint,
                tier_plan=plan,
            )
        layout = {
            "format": LAYOUT_FORMAT,
            "version": LAYOUT_VERSION,
            "n_shards": n_shards,
            "owner": OWNER_FUNCTION,
            "layout_id": layout_id,
            "backend": backend,
            "fingerprint": fingerprint,
            "tables": {
                name: {"rows": global_rows[name], "dim": int(t.shape[1]), "dtype": str(t.dtype).removeprefix("torch.")}
                for name, t in tables.items()
            },
            "shards": [shard_dir_name(i, n_shards) for i in range(n_shards)],
        }
        _write_json_fsync(tmp / LAYOUT_FILE, layout)
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{layout_id[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_layout(path: str | os.PathLike) -> dict:
    """The ``shards.json`` of a sharded store directory, validated."""
    p = Path(path) / LAYOUT_FILE
    if not p.is_file():
        raise StoreNotFoundError(
            f"{p} not found: {path} is not a sharded store (build one with `engram-store build --shards N`)"
        )
    try:
        layout = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise StoreCorruptError(f"{p} is not valid JSON ({exc}); rebuild the sharded store") from exc
    if layout.get("format") != LAYOUT_FORMAT or layout.get("version") != LAYOUT_VERSION:
        raise StoreCorruptError(
            f"{p}: format {layout.get('format')!r} version {layout.get('version')!r}, expected "
            f"{LAYOUT_FORMAT!r} version {LAYOUT_VERSION}; rebuild with this version of engram-store"
        )
    if layout.get("owner") != OWNER_FUNCTION:
        raise ShardLayoutError(
            f"{p}: rows were sharded with owner function {layout.get('owner')!r}, this engram-store "
            f"routes with {OWNER_FUNCTION!r}; rebuild the shards (`engram-store build --shards N`)"
        )
    return layout


def _check_shard_manifest(store: Any, layout: dict, shard: int, where: Path) -> None:
    plan = (getattr(store, "manifest", None) or {}).get("tier_plan") or {}
    info = plan.get("shard")
    expected = {"index": shard, "n_shards": layout["n_shards"], "owner": OWNER_FUNCTION, "layout_id": layout["layout_id"]}
    got = {k: (info or {}).get(k) for k in expected}
    if got != expected:
        raise ShardLayoutError(
            f"{where}: shard manifest says {got}, shards.json expects {expected}; the shard directories "
            "come from different builds. Rebuild with `engram-store build --shards N`"
        )


def join_shards(path: str | os.PathLike, *, chunk_rows: int = 1 << 20) -> dict[str, torch.Tensor]:
    """Read every shard of a sharded store back into full tables ``{name: Tensor[rows, dim]}``
    in original (global) row order. Checks each shard's manifest against ``shards.json``."""
    import engram_store

    root = Path(path)
    layout = read_layout(root)
    n = int(layout["n_shards"])
    out: dict[str, torch.Tensor] = {}
    for name, meta in layout["tables"].items():
        out[name] = torch.empty(int(meta["rows"]), int(meta["dim"]), dtype=getattr(torch, meta["dtype"]))
    for i in range(n):
        d = root / shard_dir_name(i, n)
        store = engram_store.open(d, fingerprint=layout.get("fingerprint"))
        try:
            _check_shard_manifest(store, layout, i, d)
            for name, meta in layout["tables"].items():
                local_n = shard_rows(int(meta["rows"]), i, n)
                have = store.tables[name].rows
                if have != local_n:
                    raise StoreCorruptError(f"{d}: table {name!r} has {have} rows, expected {local_n}; rebuild")
                dst = out[name][i::n]
                for start in range(0, local_n, chunk_rows):
                    stop = min(local_n, start + chunk_rows)
                    dst[start:stop] = store.lookup(name, torch.arange(start, stop)).to("cpu", out[name].dtype)
        finally:
            store.close()
    return out


def _write_json_fsync(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Best effort: some file systems refuse to fsync a directory; the shard stores are already synced."""
    try:
        fsync_path(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- the exchange


class LocalLookup(Protocol):
    """What a rank's own shard must offer: ``lookup(table, local_ids) -> Tensor[*ids.shape, dim]``."""

    def lookup(self, table: str, row_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Route:
    """Where the (deduplicated) ids of one exchange went; reused to send rows and gradients."""

    inverse: torch.Tensor  # [N] position of each flat id in `send_order` space (after perm)
    send_counts: list[int]  # ids this rank sends to each owner
    recv_counts: list[int]  # ids this rank receives from each requester
    recv_local: torch.Tensor  # [sum(recv_counts)] local row indices this rank must serve
    n_unique: int


@dataclass
class ExchangeStats:
    exchanges: int = 0
    ids: int = 0  # ids asked for (before dedupe)
    unique_ids: int = 0
    rows_served: int = 0  # rows this rank looked up for others and itself
    bytes_sent: int = 0  # to other ranks only (self-sends are local copies)
    bytes_received: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Exchange:
    """The all-to-all routing of row ids and rows over one process group. Synchronous;
    callers that want asynchrony run it on one thread (see :class:`ShardedStore`)."""

    def __init__(self, group: Any = None, *, device: str | torch.device = "cpu") -> None:
        if dist.is_available() and dist.is_initialized():
            self.group = group
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            self.backend = str(dist.get_backend(group))
        else:
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not initialized")
            self.group, self.rank, self.world, self.backend = None, 0, 1, "local"
        # NCCL exchanges device tensors; gloo exchanges host tensors.
        self.comm_device = torch.device(device) if self.backend == "nccl" else torch.device("cpu")
        self.seq = 0
        self.stats = ExchangeStats()
        self.short_circuit = True  # one rank: no collectives (tests turn it off to exercise them)

    # -- step 1 and 2: ids to owners
    def route(self, ids: torch.Tensor, tag: int) -> Route:
        """Send each owner the unique ids it owns. ``ids``: flat int64 global row ids."""
        t0 = time.perf_counter()
        ids = ids.to(self.comm_device, torch.int64)
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        W = self.world
        if W == 1 and self.short_circuit:
            route = Route(inverse, [uniq.numel()], [uniq.numel()], uniq, uniq.numel())
            self._account(ids.numel(), uniq.numel(), uniq.numel(), t0)
            return route
        owner = torch.remainder(uniq, W)
        perm = torch.argsort(owner, stable=True)
        send_ids = uniq[perm]
        # position of each unique id in send order, so rows_in_send_order[pos[inverse]] is the answer
        pos = torch.empty_like(perm)
        pos[perm] = torch.arange(perm.numel(), device=perm.device)
        send_counts_t = torch.bincount(owner, minlength=W)
        header = torch.stack(
            [send_counts_t, torch.full_like(send_counts_t, tag), torch.full_like(send_counts_t, self.seq)], dim=1
        )
        recv_header = torch.empty_like(header)
        dist.all_to_all_single(recv_header, header, group=self.group)
        recv_header = recv_header.cpu()
        bad = (recv_header[:, 1] != tag) | (recv_header[:, 2] != self.seq)
        if bool(bad.any()):
            peers = [int(r) for r in torch.nonzero(bad).flatten()]
            raise CollectiveOrderError(
                f"rank {self.rank}: exchange #{self.seq} (tag {tag}) but rank(s) {peers} sent tag/seq "
                f"{[(int(recv_header[p, 1]), int(recv_header[p, 2])) for p in peers]}; every rank must call "
                "prefetch/forward for the same tables in the same order"
            )
        send_counts = send_counts_t.cpu().tolist()
        recv_counts = recv_header[:, 0].tolist()
        recv_ids = torch.empty(sum(recv_counts), dtype=torch.int64, device=self.comm_device)
        dist.all_to_all_single(recv_ids, send_ids, recv_counts, send_counts, group=self.group)
        self.seq += 1
        me = self.rank
        self.stats.bytes_sent += 8 * (sum(send_counts) - send_counts[me]) + header.numel() * 8 * (W - 1) // W
        self.stats.bytes_received += 8 * (sum(recv_counts) - recv_counts[me]) + header.numel() * 8 * (W - 1) // W
        route = Route(pos[inverse], send_counts, recv_counts, torch.div(recv_ids, W, rounding_mode="floor"), uniq.numel())
        self._account(ids.numel(), uniq.numel(), int(route.recv_local.numel()), t0)
        return route

    # -- step 3: rows back to requesters
    def return_rows(self, route: Route, served: torch.Tensor) -> torch.Tensor:
        """``served``: ``[sum(recv_counts), dim]`` rows for ``route.recv_local``. Returns the rows
        for this rank's flat ids, ``[N, dim]``, bit-for-bit the owners' bytes."""
        t0 = time.perf_counter()
        if self.world == 1 and self.short_circuit:
            return served[route.inverse]
        served = served.to(self.comm_device).contiguous()
        dim, dtype = served.shape[1], served.dtype
        raw = served.view(torch.uint8)  # bytes, so any dtype crosses bit-for-bit
        out = torch.empty(sum(route.send_counts), raw.shape[1], dtype=torch.uint8, device=self.comm_device)
        dist.all_to_all_single(out, raw, route.send_counts, route.recv_counts, group=self.group)
        me, row_bytes = self.rank, raw.shape[1]
        self.stats.bytes_sent += row_bytes * (sum(route.recv_counts) - route.recv_counts[me])
        self.stats.bytes_received += row_bytes * (sum(route.send_counts) - route.send_counts[me])
        self.stats.seconds += time.perf_counter() - t0
        return out.view(dtype).view(-1, dim)[route.inverse]

    # -- backward: gradients to owners
    def send_grads(self, route: Route, grad: torch.Tensor) -> torch.Tensor:
        """``grad``: ``[N, dim]`` gradient of this rank's flat ids. Sums duplicates, sends each
        owner the rows it owns; returns ``[sum(recv_counts), dim]`` gradients for ``route.recv_local``."""
        t0 = time.perf_counter()
        grad = grad.to(self.comm_device)
        dim = grad.shape[1]
        summed = torch.zeros(route.n_unique, dim, dtype=grad.dtype, device=grad.device)
        summed.index_add_(0, route.inverse, grad)
        if self.world == 1 and self.short_circuit:
            return summed
        out = torch.empty(sum(route.recv_counts), dim, dtype=grad.dtype, device=self.comm_device)
        dist.all_to_all_single(out, summed.contiguous(), route.recv_counts, route.send_counts, group=self.group)
        me, row_bytes = self.rank, dim * grad.element_size()
        self.stats.bytes_sent += row_bytes * (sum(route.send_counts) - route.send_counts[me])
        self.stats.bytes_received += row_bytes * (sum(route.recv_counts) - route.recv_counts[me])
        self.stats.seconds += time.perf_counter() - t0
        return out

    def _account(self, n_ids: int, n_unique: int, n_served: int, t0: float) -> None:
        s = self.stats
        s.exchanges += 1
        s.ids += n_ids
        s.unique_ids += n_unique
        s.rows_served += n_served
        s.seconds += time.perf_counter() - t0


def table_tag(name: str) -> int:
    """A stable int tag for a table name (crc32), sent in the header to catch order mismatches."""
    return zlib.crc32(name.encode())


def peer_failure(rank: int, what: str, exc: BaseException, started: float) -> PeerFailureError:
    return PeerFailureError(
        f"rank {rank}: {what} failed after {time.perf_counter() - started:.1f}s: a peer rank died, hung past "
        f"the process-group timeout, or stopped issuing the same collectives (every rank must call "
        f"prefetch for the same tables in the same order). Cause: {type(exc).__name__}: {exc}"
    )


# ----------------------------------------------------------------------------- sharded store


@dataclass(frozen=True)
class ShardedTableInfo:
    rows: int  # global rows
    dim: int
    dtype: torch.dtype


class DenseShard:
    """A rank's shard held as dense tensors (``{name: Tensor[local_rows, dim]}``); for tests
    and small tables. Anything with ``lookup(table, local_ids)`` can stand in its place."""

    def __init__(self, tables: Mapping[str, torch.Tensor]) -> None:
        self._tables = dict(tables)

    @classmethod
    def from_full(cls, tables: Mapping[str, torch.Tensor], shard: int, n_shards: int) -> "DenseShard":
        return cls({name: t[shard::n_shards].contiguous() for name, t in tables.items()})

    def lookup(self, table: str, row_ids: torch.Tensor) -> torch.Tensor:
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
        mine = [layout_id, sorted((k, v.rows, v.dim, str(v.dtype)) for k, v in self.tables.items())]
        gathered: list = [None] * dist.get_world_size(self._own_group)
        dist.all_gather_object(gathered, mine, group=self._own_group)
        if any(g != mine for g in gathered):
            raise ShardLayoutError(
                f"rank {dist.get_rank(self._own_group)}: ranks opened different sharded stores "
                f"({[g[0] for g in gathered]}); launch every rank on the same directory"
            )

    # -- lookups
    def prefetch(self, table: str, row_ids: torch.Tensor) -> ShardedHandle:
        """Start fetching global ``row_ids`` (any shape) of ``table``; returns at once.
        Collective: every rank must call it for the same table, in the same order."""
        info = self._info(table)
        ids = as_id_tensor(row_ids, info.rows, table)
        with self._lock:
            if self._closed:
                raise StoreClosedError("prefetch on a closed ShardedStore; open it again")
            if self._failed is not None:
                raise PeerFailureError(f"rank {self.rank}: an earlier exchange failed ({self._failed}); "
                                       "the sharded store cannot be used any more, restart all ranks")
            started = time.perf_counter()
            fut = self._pool.submit(self._run, table, ids.reshape(-1), started)
        return ShardedHandle(fut, tuple(ids.shape), info.dim, self.rank, table, started, self.timeout + 5.0)

    def lookup(self, table: str, row_ids: torch.Tensor) -> torch.Tensor:
        """Synchronous :meth:`prefetch` + ``wait``."""
        return self.prefetch(table, row_ids).wait()

    def table(self, name: str) -> "_ShardedTableView":
        """An object with the MemoryTable protocol (rows, dim, prefetch) for EngramLM.set_memory."""
        info = self._info(name)
        return _ShardedTableView(self, name, info.rows, info.dim)

    def _run(self, table: str, flat: torch.Tensor, started: float) -> torch.Tensor:
        ex = self._exchange
        try:
            route = ex.route(flat, table_tag(table))
            served = self.local.lookup(table, route.recv_local.to(self.device) if self.device.type != "cpu"
                                       else route.recv_local)
            rows = ex.return_rows(route, served.reshape(-1, self.tables[table].dim))
        except CollectiveOrderError as exc:
            self._failed = exc
            raise
        except EngramStoreError:
            raise
        except Exception as exc:  # gloo/NCCL errors: RuntimeError, DistBackendError, DistNetworkError
            err = peer_failure(self.rank, f"prefetch({table!r}) exchange #{ex.seq}", exc, started)
            self._failed = err
            raise err from exc
        return rows.to(self.device)

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
    import engram_store

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
    local = engram_store.open(d, device=device, hbm_bytes=hbm_bytes, dram_bytes=dram_bytes, backend=backend,
                              fingerprint=fingerprint if fingerprint is not None else layout.get("fingerprint"))
    try:
        _check_shard_manifest(local, layout, rank, d)
        tables = {name: ShardedTableInfo(int(m["rows"]), int(m["dim"]), getattr(torch, m["dtype"]))
                  for name, m in layout["tables"].items()}
        return ShardedStore(local, tables, group=group, device=device, timeout=timeout, layout_id=layout["layout_id"])
    except BaseException:
        local.close()
        raise
