"""Owner function ``row_mod_n``: row ``r`` lives on rank ``r % n`` at local index ``r // n``.

Hashed N-gram row ids are spread uniformly and a frequency-ordered table has its hot rows at the
low ids: the modulo deals consecutive (equally hot) rows to different ranks, so every rank serves
about the same share of the traffic.
"""

from __future__ import annotations

import torch

from engram_store.sharded.owner import Owner


class RowModN(Owner):
    name = "row_mod_n"

    def owner_of(self, row_ids: torch.Tensor) -> torch.Tensor:
        return torch.remainder(row_ids, self.n_shards)

    def local_index(self, row_ids: torch.Tensor) -> torch.Tensor:
        return torch.div(row_ids, self.n_shards, rounding_mode="floor")

    def global_index(self, local_ids: torch.Tensor, shard: int) -> torch.Tensor:
        return local_ids * self.n_shards + shard

    def shard_rows(self, shard: int) -> int:
        return max(0, (self.rows - shard + self.n_shards - 1) // self.n_shards)
