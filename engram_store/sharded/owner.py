"""The owner-function interface: which rank holds a global row, and where in its shard.

An owner function partitions one table's ``rows`` global row ids over ``n_shards`` ranks. Every
implementation keeps each shard's rows in increasing global order (``local_index`` is monotonic
within a shard), so a stream of rows in global order reaches every shard in local order. One file
per function: :mod:`.row_mod_n` (``row % n``) and :mod:`.head_ranges` (whole hash heads, contiguous
row ranges, as tensor-parallel engines split a V4.1 layer). ``shards.json`` records the function's
name and, per table, what it needs to be rebuilt (:meth:`Owner.to_json`, :func:`owner_from_json`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engram_store.errors import InvalidValuesError, ShardLayoutError


class Owner(ABC):
    """Owner function of one table: ``rows`` global rows over ``n_shards`` ranks."""

    name: str = ""

    def __init__(self, rows: int, n_shards: int) -> None:
        if int(n_shards) < 1:
            raise InvalidValuesError(f"n_shards must be >= 1, got {n_shards}")
        if int(rows) < 0:
            raise InvalidValuesError(f"rows must be >= 0, got {rows}")
        self.rows, self.n_shards = int(rows), int(n_shards)

    @abstractmethod
    def owner_of(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Rank owning each global row id (same shape, int64)."""

    @abstractmethod
    def local_index(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Row index inside the owner's shard (same shape, int64)."""

    @abstractmethod
    def global_index(self, local_ids: torch.Tensor, shard: int) -> torch.Tensor:
        """Inverse of (owner_of, local_index) for the rows of ``shard``."""

    @abstractmethod
    def shard_rows(self, shard: int) -> int:
        """Rows of the table that ``shard`` owns."""

    def to_json(self) -> dict:
        """What ``shards.json`` records for this table besides the function's name."""
        return {}

    def shard_json(self, shard: int) -> dict:
        """What shard ``shard``'s manifest records for this table (checked on open)."""
        return {}

    def describe(self) -> tuple:
        """A comparable summary (ranks check they opened the same layout)."""
        return (self.name, self.rows, self.n_shards, tuple(sorted((k, repr(v)) for k, v in self.to_json().items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Owner) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash(self.describe())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rows={self.rows}, n_shards={self.n_shards})"


def owner_from_json(owner: str, rows: int, n_shards: int, entry: dict, where: str) -> Owner:
    """The owner function of one ``shards.json`` table entry; ShardLayoutError names a function this
    engram-store does not know, StoreCorruptError a malformed entry."""
    from engram_store.sharded.head_ranges import HeadRanges
    from engram_store.sharded.row_mod_n import RowModN

    if owner == RowModN.name:
        return RowModN(rows, n_shards)
    if owner == HeadRanges.name:
        return HeadRanges.from_json(rows, n_shards, entry, where)
    raise ShardLayoutError(
        f"{where}: rows were sharded with owner function {owner!r}, this engram-store routes with "
        f"{sorted(OWNER_FUNCTIONS)}; rebuild the shards (`engram-store build --shards N`)"
    )


OWNER_FUNCTIONS = ("head_ranges", "row_mod_n")
