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

from engram_store.ids import as_ids
from engram_store.prefetch.handle import Pending, Ready


def table_name(layer: int) -> str:
    """The name of an Engram layer's table, in checkpoints and stores alike."""
    return f"layer{layer}"


@runtime_checkable
class MemoryTable(Protocol):
    rows: int
    dim: int

    def prefetch(self, row_ids: torch.Tensor) -> Pending:
        """Start fetching ``row_ids`` (any shape); returns at once."""


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

    def prefetch(self, row_ids: torch.Tensor) -> Ready:
        as_ids(row_ids, self.rows, "param")
        weight, sparse = self.weight, self.sparse
        ids = row_ids.to(weight.device)
        return Ready(fn=lambda: F.embedding(ids, weight, sparse=sparse))

    def extra_repr(self) -> str:
        return f"rows={self.rows}, dim={self.dim}"
