"""A trainable Engram table sharded across ranks (the paper's All-to-All training setup).

Each rank owns the rows its owner function gives it (``row % world`` by default, or whole hash
heads with :class:`engram_store.sharded.HeadRanges`, as :mod:`engram_store.sharded` shards stores)
and keeps them, their gradients and their Adam state; nothing of the table is replicated.

forward:  ids ──all_to_all──► owners gather local rows ──all_to_all──► rows   (differentiable)
backward: row grads (duplicates summed) ──all_to_all──► owners accumulate
step():   each owner applies Adam to its own rows (no communication)

Collective: every rank runs forward *and* backward of every ShardedEmbedding in the same
order (a rank whose loss does not use a table's output must still call ``backward`` on
it, e.g. ``(out * 0).sum()``), and calls ``step()``/``zero_grad()`` in step. Exchanges run
on a process group of the table's own, so they never interleave with DDP's all-reduces.

Gradient scale: with ``grad_average=True`` (default) owners divide the summed gradients
by the world size, as DDP averages dense gradients; so W ranks on W slices of a batch
whose per-rank loss is a mean give the gradient of the whole batch's mean loss.

Two Adam variants, both with state for owned rows only:
- ``lazy=True`` (default, sparse updates): only rows that received a gradient this step
  move, exactly ``torch.optim.SparseAdam`` on an ``nn.Embedding(sparse=True)``.
- ``lazy=False``: every owned row moves every step, exactly ``torch.optim.Adam`` on a dense
  weight (what a single-process ParamMemoryTable trains with); O(owned rows) per step.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engram_store.errors import CollectiveOrderError, EngramStoreError, InvalidRowIdsError, ShardLayoutError
from engram_store.prefetch.handle import Ready
from engram_store.sharded.exchange import DEFAULT_TIMEOUT_S, Exchange, Route, peer_failure, table_tag
from engram_store.sharded.owner import Owner
from engram_store.sharded.row_mod_n import RowModN


class _ShardedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: torch.Tensor, table: "ShardedEmbedding", flat_ids: torch.Tensor) -> torch.Tensor:
        route = table._call(lambda ex: ex.route(flat_ids, table._tag, table.owner), "forward ids")
        served = table.local_weight.detach()[route.recv_local.to(table.local_weight.device)]
        rows = table._call(lambda ex: ex.return_rows(route, served), "forward rows")
        ctx.table, ctx.route = table, route
        return rows.to(table.local_weight.device)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        table: ShardedEmbedding = ctx.table
        route: Route = ctx.route
        owned = table._call(lambda ex: ex.send_grads(route, grad_rows.contiguous()), "backward grads")
        table._accumulate(route.recv_local, owned)
        return torch.zeros_like(table._anchor), None, None


class ShardedEmbedding(nn.Module):
    """``rows x dim`` table, row ``r`` held by rank ``owner.owner_of(r)`` (default ``r % world``). Satisfies engram_model's
    MemoryTable protocol (``rows``, ``dim``, ``prefetch(row_ids) -> Pending``), so
    ``model.set_memory({layer: ShardedEmbedding(...)})`` trains EngramLM across ranks.

    ``weight``: optional full initial table ``[rows, dim]`` (every rank passes the same one;
    each keeps its rows); otherwise rows are drawn N(0, ``init_std``) from a generator seeded
    by ``seed`` in global row order, so the table is the same for any world size.
    ``owner``: an owner function of :mod:`engram_store.sharded` for ``rows`` rows and ``world``
    shards (default ``RowModN``). Construction is collective (it creates the table's own process group).
    """

    def __init__(
        self,
        rows: int,
        dim: int,
        *,
        weight: torch.Tensor | None = None,
        init_std: float = 0.02,
        seed: int = 0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lazy: bool = True,
        grad_average: bool = True,
        group: Any = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        owner: Owner | None = None,
    ) -> None:
        super().__init__()
        self.rows, self.dim = int(rows), int(dim)
        self.lr, self.betas, self.eps, self.lazy, self.grad_average = lr, betas, eps, lazy, grad_average
        self.timeout = float(timeout)
        own_group = None
        if dist.is_available() and dist.is_initialized():
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            own_group = dist.new_group(ranks, timeout=timedelta(seconds=self.timeout), backend=dist.get_backend(group))
        self._exchange = Exchange(own_group)
        self.rank, self.world_size = self._exchange.rank, self._exchange.world
        self.owner = owner if owner is not None else RowModN(self.rows, self.world_size)
        if self.owner.rows != self.rows or self.owner.n_shards != self.world_size:
            raise ShardLayoutError(f"owner {self.owner!r} does not fit a {self.rows}-row table on {self.world_size} "
                                   "ranks; build it for this table and world size")
        self._tag = table_tag(f"ShardedEmbedding:{self.rows}x{self.dim}")
        if weight is None:
            g = torch.Generator().manual_seed(seed)
            weight = torch.randn(self.rows, self.dim, generator=g) * init_std
        if tuple(weight.shape) != (self.rows, self.dim):
            raise ValueError(f"weight must have shape ({self.rows}, {self.dim}), got {tuple(weight.shape)}")
        # plain tensors, not Parameters/buffers: DDP must neither all-reduce nor broadcast them
        mine = self.owner.global_index(torch.arange(self.owner.shard_rows(self.rank)), self.rank)
        self.local_weight = weight.detach()[mine].clone().float().contiguous()
        self.exp_avg = torch.zeros_like(self.local_weight)
        self.exp_avg_sq = torch.zeros_like(self.local_weight)
        self.step_count = 0
        self._grad_ids: list[torch.Tensor] = []
        self._grad_rows: list[torch.Tensor] = []
        self._grad_scale = 1.0  # set by clip_grad_norm_, applied at step()
        self._anchor = torch.zeros(0, requires_grad=True)  # gives autograd an input to differentiate
        self._failed: BaseException | None = None

    # -- the MemoryTable protocol
    def prefetch(self, row_ids: torch.Tensor) -> Ready:
        return Ready(self(row_ids))

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Rows for global ``row_ids`` (any shape) -> ``[*row_ids.shape, dim]``, differentiable."""
        ids = torch.as_tensor(row_ids)
        if ids.is_floating_point() or ids.is_complex():
            raise InvalidRowIdsError(f"row ids must be integers, got {ids.dtype}")
        ids = ids.to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise InvalidRowIdsError(f"row ids must be in [0, {self.rows}), got [{int(ids.min())}, {int(ids.max())}]")
        out = _ShardedGather.apply(self._anchor, self, ids.reshape(-1))
        return out.view(*ids.shape, self.dim)

    def _call(self, fn, what: str):
        if self._failed is not None:
            raise EngramStoreError(f"rank {self.rank}: an earlier exchange failed ({self._failed}); restart all ranks")
        started = time.perf_counter()
        try:
            return fn(self._exchange)
        except CollectiveOrderError as exc:
            self._failed = exc
            raise
        except EngramStoreError:
            raise
        except Exception as exc:
            err = peer_failure(self.rank, f"ShardedEmbedding {what}", exc, started)
            self._failed = err
            raise err from exc

    # -- optimizer (owner side)
    def _accumulate(self, local_ids: torch.Tensor, grads: torch.Tensor) -> None:
        self._grad_ids.append(local_ids.cpu())
        self._grad_rows.append(grads.cpu().float())

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - nn.Module signature
        self._grad_ids.clear()
        self._grad_rows.clear()
        self._grad_scale = 1.0

    def local_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulated gradient of owned rows: (unique local ids, ``[U, dim]`` rows), scaled."""
        if not self._grad_ids:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.dim)
        ids = torch.cat(self._grad_ids)
        rows = torch.cat(self._grad_rows)
        uniq, inv = torch.unique(ids, return_inverse=True)
        g = torch.zeros(uniq.numel(), self.dim).index_add_(0, inv, rows)
        if self.grad_average and self.world_size > 1:
            g /= self.world_size
        if self._grad_scale != 1.0:
            g *= self._grad_scale
        return uniq, g

    def grad_sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of the whole table's gradient (collective: all_reduce over owners)."""
        _, g = self.local_grad()
        sq = g.double().pow(2).sum().reshape(1)
        if self.world_size > 1:
            self._call(lambda ex: dist.all_reduce(sq, group=ex.group), "grad norm")
        return sq[0]

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step on owned rows (local; every rank calls it once per training step)."""
        ids, g = self.local_grad()
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.step_count
        bc2 = 1 - b2**self.step_count
        if self.lazy:  # torch.optim.SparseAdam, row-wise
            if ids.numel() == 0:
                return
            m_old, v_old = self.exp_avg[ids], self.exp_avg_sq[ids]
            m = m_old + (g - m_old) * (1 - b1)
            v = v_old + (g * g - v_old) * (1 - b2)
            self.exp_avg[ids], self.exp_avg_sq[ids] = m, v
            step_size = self.lr * math.sqrt(bc2) / bc1
            self.local_weight[ids] -= step_size * (m / (v.sqrt() + self.eps))
        else:  # torch.optim.Adam on the dense weight (rows without gradient see g = 0)
            dense = torch.zeros_like(self.local_weight)
            dense[ids] = g
            self.exp_avg.lerp_(dense, 1 - b1)
            self.exp_avg_sq.mul_(b2).addcmul_(dense, dense, value=1 - b2)
            denom = (self.exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(self.eps)
            self.local_weight.addcdiv_(self.exp_avg, denom, value=-self.lr / bc1)

    # -- whole-table views (collective)
    def full_weight(self) -> torch.Tensor:
        """The whole table ``[rows, dim]`` on every rank (all_gather; for checkpoints and tests)."""
        if self.world_size == 1:
            return self.local_weight.clone()
        W = self.world_size
        n_max = max(self.owner.shard_rows(r) for r in range(W))
        padded = torch.zeros(n_max, self.dim)
        padded[: self.local_weight.shape[0]] = self.local_weight
        parts = [torch.empty_like(padded) for _ in range(W)]
        dist.all_gather(parts, padded, group=self._exchange.group)
        full = torch.empty(self.rows, self.dim)
        for r in range(W):
            k = self.owner.shard_rows(r)
            full[self.owner.global_index(torch.arange(k), r)] = parts[r][:k]
        return full

    def exchange_stats(self) -> dict:
        return self._exchange.stats.as_dict()

    def extra_repr(self) -> str:
        return f"rows={self.rows}, dim={self.dim}, rank={self.rank}/{self.world_size}, lazy={self.lazy}"


def clip_grad_norm_(parameters, tables: list[ShardedEmbedding], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over replicated dense ``parameters`` (gradients already
    averaged across ranks, e.g. by DDP) plus sharded ``tables``: one global norm, the same
    clip factor on every rank. Collective. Returns the total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    dense_sq = sum((g.detach().double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64))
    table_sq = sum((t.grad_sq_norm() for t in tables), torch.zeros((), dtype=torch.float64))
    total = (dense_sq + table_sq).sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.dtype))
    for t in tables:
        t._grad_scale *= float(coef)
    return total
