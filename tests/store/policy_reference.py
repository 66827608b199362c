"""What both per-key reference policies share: dict records, the warm fill and what an access stamps.

Written from ``SlotPolicy``'s docstring, independently of it: keys are plain ints, records plain
dicts, slots a list. Each reference (``test_policy_admission``, ``test_policy_hints``) adds its
own admission and eviction rule on top.
"""

from __future__ import annotations

import math


class RefRecords:
    def __init__(self, n_keys: int, cap: int, order, recency: float | None) -> None:
        self.cap, self.order, self.recency = min(cap, n_keys), order, recency
        self.slot_of: dict[int, int] = {}
        self.key_of = [-1] * self.cap
        self.last: dict[int, int] = {}
        self.acc: dict[int, int] = {}
        self.clock = self.hits = 0
        self.evict_batch = max(1, math.ceil(self.cap / 64))

    def warm(self, keys) -> None:
        for i, k in enumerate(keys[: self.cap]):
            self.key_of[i], self.slot_of[int(k)], self.last[int(k)] = int(k), i, -1 - i

    def stamp(self, keys) -> tuple[list[int], list[int], list[int]]:
        """One access's bookkeeping before any admission: the clock ticks, every key's count goes up,
        hits are counted and their last use set. Returns ``(keys, slots, miss positions)``."""
        keys = [int(k) for k in keys]
        self.clock += 1
        for k in keys:
            self.acc[k] = self.acc.get(k, 0) + 1
        slots = [self.slot_of.get(k, -1) for k in keys]
        self.hits += len({s for s in slots if s >= 0})
        for k, s in zip(keys, slots):
            if s >= 0:
                self.last[k] = self.clock
        return keys, slots, [i for i, s in enumerate(slots) if s < 0]
