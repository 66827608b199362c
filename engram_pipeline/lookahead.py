"""A data loader that tells the store what is coming: Engram row ids of the next batches, as hints.

A training (or batch-serving) loop knows its next batches before it runs them -- Bagpipe's
"oracle cacher" observation. The Engram row ids of a batch depend only on its tokens, so the
loader hashes each batch as it enters a window of ``window`` batches ahead and calls
``store.hint(table, row_ids)`` for each Engram layer; the store's DRAM tier then keeps what the
window needs (``SlotPolicy.hint``). Hints are not fetches: nothing is read early, and a hint
that turns out wrong costs hit rate, never correctness.

Each batch is hinted exactly once, in order, before it is yielded, which is the protocol
``TieredStore.hint`` expects (one announcement per upcoming prefetch of each table).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from engram_store.errors import EngramStoreError


class LookaheadLoader:
    """Iterate ``batches`` (compressed token ids ``[B, T]``) as ``(tokens, {layer: row ids [B, T, K]})``,
    hinting ``store`` with each batch's row ids ``window`` batches before the batch is yielded.

    ``hasher``: the model's ``NgramHasher``; ``table_of``: layer id -> the store's table name.
    ``window=0`` hints nothing (the store then behaves as without hints).
    """

    def __init__(self, batches: Iterable, hasher, store, window: int,
                 table_of: Callable[[int], str] = lambda layer: f"layer{layer}") -> None:
        if window < 0:
            raise EngramStoreError(f"window must be >= 0 batches ahead, got {window}")
        self.batches, self.hasher, self.store, self.window, self.table_of = batches, hasher, store, window, table_of
        self.hinted = 0  # batches announced to the store

    def _hashed(self) -> Iterator[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        for tokens in self.batches:
            tokens = torch.as_tensor(tokens)
            yield tokens, self.hasher.row_ids(tokens)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        ready: deque = deque()
        source = self._hashed()
        exhausted = False
        while True:
            # keep the batch about to run and the ``window`` after it hashed and announced
            while not exhausted and len(ready) < 1 + self.window:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                    break
                if self.window:
                    for layer, rows in nxt[1].items():
                        self.store.hint(self.table_of(layer), np.asarray(rows).reshape(-1))
                    self.hinted += 1
                ready.append(nxt)
            if not ready:
                return
            yield ready.popleft()
