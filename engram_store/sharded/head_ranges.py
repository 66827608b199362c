"""Owner function ``head_ranges``: rank ``r`` owns whole hash heads, a contiguous range of rows.

A V4.1 Engram layer is one concatenated table of ``K = orders x heads`` blocks, one per hash head
(order-2 heads first, row = ``offset[head] + hash``; the block sizes are the heads' primes,
``engram_model.hashing.NgramHasher.primes``). Tensor-parallel engines split a layer by whole heads,
so a rank's lookups hit only its own heads: rank ``r`` of ``W`` owns heads ``[h_r, h_{r+1})`` and
rows ``[offset[h_r], offset[h_{r+1}])``, at local index ``row - offset[h_r]``.

The split rule (as ``numpy.array_split``): the first ``K % W`` ranks get ``ceil(K / W)`` heads, the
others ``floor(K / W)``; ``W`` must not exceed ``K`` (every rank owns at least one head). When ``W``
divides ``K`` every rank gets ``K / W`` heads, e.g. 6 of a V4.1 layer's 24 at ``W = 4``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engram_store.errors import InvalidValuesError, StoreCorruptError
from engram_store.sharded.owner import Owner


def split_heads(n_heads: int, n_shards: int) -> list[tuple[int, int]]:
    """Head ranges ``[(h0, h1), ...]`` per rank by the module's rule."""
    if n_shards > n_heads:
        raise InvalidValuesError(
            f"head_ranges: {n_shards} ranks but only {n_heads} heads; every rank must own a whole head: "
            f"use at most {n_heads} shards or owner='row_mod_n'")
    base, extra = divmod(n_heads, n_shards)
    out, h = [], 0
    for r in range(n_shards):
        k = base + (1 if r < extra else 0)
        out.append((h, h + k))
        h += k
    return out


class HeadRanges(Owner):
    name = "head_ranges"

    def __init__(self, head_rows: Sequence[int], n_shards: int) -> None:
        rows = list(head_rows) if isinstance(head_rows, (list, tuple)) else None
        if (not rows or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in rows)):
            raise InvalidValuesError(
                f"head_ranges needs the rows of every hash head as a non-empty list of ints >= 1 "
                f"(NgramHasher.primes of the layer, order-2 heads first), got {head_rows!r}")
        super().__init__(sum(rows), n_shards)
        self.head_rows = rows
        self.heads = split_heads(len(rows), self.n_shards)
        starts = [0]
        for v in rows:
            starts.append(starts[-1] + v)
        self.ranges = [(starts[h0], starts[h1]) for h0, h1 in self.heads]
        self._starts = torch.tensor([a for a, _ in self.ranges], dtype=torch.int64)
        self._bounds = self._starts[1:].contiguous()

    @classmethod
    def from_json(cls, rows: int, n_shards: int, entry: dict, where: str) -> "HeadRanges":
        head_rows, ranges = entry.get("head_rows"), entry.get("ranges")
        try:
            owner = cls(head_rows, n_shards)
        except InvalidValuesError as exc:
            raise StoreCorruptError(f"{where}: bad head_ranges entry ({exc}); rebuild the shards") from None
        if owner.rows != rows or ranges != [list(r) for r in owner.ranges]:
            raise StoreCorruptError(
                f"{where}: head_ranges ranges {ranges!r} for {rows} rows do not follow from head_rows "
                f"{head_rows!r} at {n_shards} shards (expected {[list(r) for r in owner.ranges]}); rebuild the shards")
        return owner

    def _on(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return t if t.device == device else t.to(device)

    def owner_of(self, row_ids: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self._on(self._bounds, row_ids.device), row_ids.contiguous(), right=True)

    def local_index(self, row_ids: torch.Tensor) -> torch.Tensor:
        return row_ids - self._on(self._starts, row_ids.device)[self.owner_of(row_ids)]

    def global_index(self, local_ids: torch.Tensor, shard: int) -> torch.Tensor:
        return local_ids + self.ranges[shard][0]

    def shard_rows(self, shard: int) -> int:
        a, b = self.ranges[shard]
        return b - a

    def to_json(self) -> dict:
        return {"head_rows": list(self.head_rows), "ranges": [list(r) for r in self.ranges]}

    def shard_json(self, shard: int) -> dict:
        return {"range": list(self.ranges[shard]), "heads": list(self.heads[shard])}
