"""The memory-table interface between the Engram model and whatever holds its embedding rows.

The model only ever calls ``table.prefetch(row_ids)`` (as soon as the token ids are known,
before the first block) and ``pending.wait()`` (at the Engram layer). Training uses
``ParamMemoryTable``, an ordinary parameter; serving plugs in a tiered store's table
(``engram_store`` returns objects with the same three members).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_store.errors import InvalidRowIdsError


@runtime_checkable
class Pending(Protocol):
    def wait(self) -> torch.Tensor:
        """Rows of the prefetch: Tensor[*row_ids.shape, dim]."""

    def done(self) -> bool:
        """True when wait() would not block."""


@runtime_checkable
class MemoryTable(Protocol):
    rows: int
    dim: int

    def prefetch(self, row_ids: torch.Tensor) -> Pending:
        """Start fetching ``row_ids`` (any shape); returns at once."""


class ReadyPending:
    """A Pending whose result is computed on the caller's thread at wait() (never blocks on I/O)."""

    __slots__ = ("_fn", "_value")

    def __init__(self, fn):
        self._fn = fn
        self._value = None

    def done(self) -> bool:
        return True

    def wait(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._fn()
            self._fn = None
        return self._value


def check_row_ids(row_ids: torch.Tensor, rows: int) -> None:
    """Raise InvalidRowIdsError unless ``row_ids`` is an integer tensor with values in [0, rows)."""
    if not isinstance(row_ids, torch.Tensor) or row_ids.dtype.is_floating_point or row_ids.dtype == torch.bool:
        raise InvalidRowIdsError(f"row ids must be an integer tensor, got {getattr(row_ids, 'dtype', type(row_ids))}")
    if row_ids.numel():
        lo, hi = int(row_ids.min()), int(row_ids.max())
        if lo < 0 or hi >= rows:
            raise InvalidRowIdsError(f"row id {lo if lo < 0 else hi} is outside the table's [0, {rows})")


class ParamMemoryTable(nn.Module):
    """A trainable table: ``weight`` is an nn.Parameter [rows, dim]; lookups are differentiable.

    ``sparse=True`` gives sparse gradients (only the looked-up rows), for ``torch.optim.SparseAdam``.
    """

    def __init__(self, rows: int, dim: int, init_std: float = 1.0, sparse: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.init_std = init_std
        self.sparse = sparse
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def prefetch(self, row_ids: torch.Tensor) -> ReadyPending:
        check_row_ids(row_ids, self.rows)
        weight, sparse = self.weight, self.sparse
        ids = row_ids.to(weight.device)
        return ReadyPending(lambda: F.embedding(ids, weight, sparse=sparse))

    def extra_repr(self) -> str:
        return f"rows={self.rows}, dim={self.dim}"
