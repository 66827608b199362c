"""The HBM tier: ranks ``[0, H)`` of a table as one ``[H, row_bytes]`` uint8 tensor on the device.

Membership is ``rank < H`` and the slot is the rank itself: no hash map on the device.
Rows are kept as raw bytes so one code path serves float32 / float16 / bfloat16.
Thread-safety: reads (gathers) from many threads; :meth:`refresh` only under the store lock
with no gather of the table in flight (the store drains them first).
"""

from __future__ import annotations

import numpy as np
import torch

from engram_store.resident.dram import row_buffer, rows_view
from engram_store.resident.hit_path import row_word


class HbmTier:
    def __init__(self, rows: np.ndarray, device: torch.device) -> None:
        self.rows = int(rows.shape[0])
        if torch.device(device).type == "cpu":  # laid out for random row reads (dram.row_buffer)
            buf = row_buffer(*rows.shape)
            buf[...] = rows
            self.data = torch.from_numpy(buf)  # (H, row_bytes) uint8
        else:
            self.data = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        # on a CPU device, the same bytes for np.take (see dram.rows_view); refresh writes in place
        self.host_rows = rows_view(self.data.numpy()) if self.data.device.type == "cpu" else None
        # ... and as words for hit_path.serve; empty on a GPU (the device gathers those rows)
        word = row_word(self.data.shape[1])
        self.host_words = (self.data.numpy().view(word).reshape(-1) if self.host_rows is not None
                           else np.empty(0, word))

    def refresh(self, ranks: np.ndarray, rows: np.ndarray) -> None:
        if ranks.size:
            idx = torch.from_numpy(ranks).to(self.data.device)
            self.data[idx] = torch.from_numpy(np.ascontiguousarray(rows)).to(self.data.device)
