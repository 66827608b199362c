"""The HBM tier: ranks ``[0, H)`` of a table as one ``[H, row_bytes]`` uint8 tensor on the device.

Membership is ``rank < H`` and the slot is the rank itself: no hash map on the device.
Rows are kept as raw bytes so one code path serves float32 / float16 / bfloat16.
Thread-safety: :meth:`gather` from many threads; :meth:`refresh` only under the store lock
with no gather of the table in flight (the store drains them first).
"""

from __future__ import annotations

import numpy as np
import torch

from .dram import rows_view


class HbmTier:
    def __init__(self, rows: np.ndarray, device: torch.device) -> None:
        self.rows = int(rows.shape[0])
        self.data = torch.from_numpy(np.ascontiguousarray(rows)).to(device)  # (H, row_bytes) uint8
        # on a CPU device, the same bytes for np.take (see dram.rows_view); refresh writes in place
        self.host_rows = rows_view(self.data.numpy()) if self.data.device.type == "cpu" else None

    def gather(self, ranks: torch.Tensor) -> torch.Tensor:
        return self.data.index_select(0, ranks)

    def refresh(self, ranks: np.ndarray, rows: np.ndarray) -> None:
        if ranks.size:
            idx = torch.from_numpy(ranks).to(self.data.device)
            self.data[idx] = torch.from_numpy(np.ascontiguousarray(rows)).to(self.data.device)
