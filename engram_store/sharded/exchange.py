"""The exchange: routing row ids to their owners and rows back, with ``all_to_all_single``.

A lookup is three collectives over one process group:

1. a header ``[W, 3]`` int64: per destination the number of ids, a table tag and a
   sequence number (a rank that calls prefetch for another table, or skipped a call,
   is detected here and every rank raises :class:`CollectiveOrderError`);
2. the (deduplicated) ids, with split sizes from the header;
3. the rows, as raw bytes (``uint8`` views, so the result is bit-for-bit the owner's
   row whatever the dtype), back along the reverse splits.

Backward (training, :mod:`engram_model.sharded_table`) sends gradients along the same route.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engram_store.errors import CollectiveOrderError, PeerFailureError, ShardLayoutError

DEFAULT_TIMEOUT_S = 30.0


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
    def route(self, ids: torch.Tensor, tag: int, owner: Any = None) -> Route:
        """Send each owner the unique ids it owns. ``ids``: flat int64 global row ids; ``owner``:
        the table's owner function (:class:`engram_store.sharded.owner.Owner`; None: ``row % W``)."""
        t0 = time.perf_counter()
        ids = ids.to(self.comm_device, torch.int64)
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        W = self.world
        if owner is not None and owner.n_shards != W:
            raise ShardLayoutError(f"rank {self.rank}: the table is sharded {owner.n_shards} ways but the process "
                                   f"group has {W} ranks; launch one rank per shard")
        if W == 1 and self.short_circuit:
            route = Route(inverse, [uniq.numel()], [uniq.numel()], uniq, uniq.numel())
            self._account(ids.numel(), uniq.numel(), uniq.numel(), t0)
            return route
        dest = torch.remainder(uniq, W) if owner is None else owner.owner_of(uniq)
        perm = torch.argsort(dest, stable=True)
        send_ids = uniq[perm]
        # position of each unique id in send order, so rows_in_send_order[pos[inverse]] is the answer
        pos = torch.empty_like(perm)
        pos[perm] = torch.arange(perm.numel(), device=perm.device)
        send_counts_t = torch.bincount(dest, minlength=W)
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
        local = torch.div(recv_ids, W, rounding_mode="floor") if owner is None else owner.local_index(recv_ids)
        route = Route(pos[inverse], send_counts, recv_counts, local, uniq.numel())
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
