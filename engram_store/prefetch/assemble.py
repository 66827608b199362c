"""The last step of a prefetch: every row into ``[*shape, dim]`` on the store's device.

Host rows (DRAM slab, disk misses, and HBM rows when the "HBM" tier is host memory) are gathered
into the plan's host buffer; on CUDA that buffer is pinned and copied up on the store's side
stream, and HBM rows are gathered on the device there. The event recorded on the side stream
is what ``Handle.wait`` makes the caller's stream wait for. Rows of a table with a row format are
decoded there too (``plan.decode``), on the device, after the gather: the table is never decoded whole.
"""

from __future__ import annotations

import numpy as np
import torch

from engram_store.format import fp8_rows
from engram_store.resident.dram import rows_view
from engram_store.resident.table import DISK, DRAM, HBM

# row format -> its decoder (packed rows [..., row_bytes] -> values [..., values])
DECODERS = {fp8_rows.FORMAT_NAME: fp8_rows.dequantize}


def assemble(plan, miss_rows: np.ndarray | None, device: torch.device, side_stream) -> tuple[torch.Tensor, object]:
    """``(rows, event or None)`` for ``plan``; ``miss_rows``: the rows its disk read returned, in miss order."""
    t = plan.t
    parts = plan.parts
    on_cuda = device.type == "cuda"
    # host sources as row-item views (dram.rows_view): np.take copies whole rows, one thread
    sources = {HBM: t.hbm.host_rows, DRAM: t.dram.slab_rows}
    if miss_rows is not None:
        sources[DISK] = rows_view(np.ascontiguousarray(miss_rows))
    host = [part for part in parts if part[0] != HBM or not on_cuda]
    event = None
    out, plan.out = plan.out, None  # a handle keeps its plan until released: do not keep the host copy too
    if host:
        out_rows = rows_view(out.numpy())
        for c, pos, idx in host:
            # mode="clip" only skips numpy's buffered bounds check: every index is in range by
            # construction (ranks < H, slots from the policy >= 0, miss positions < len(miss_rows))
            if pos is None:
                np.take(sources[c], idx, out=out_rows, mode="clip")
            else:
                out_rows[pos] = np.take(sources[c], idx, mode="clip")
    if on_cuda:
        with torch.cuda.stream(side_stream):
            if host or plan.host_done:
                out = out.to(device, non_blocking=True)
            else:
                out = torch.empty((plan.n, t.row_bytes), dtype=torch.uint8, device=device)
            for c, pos, idx in parts:
                if c != HBM:
                    continue
                idx = torch.from_numpy(idx).to(device, non_blocking=True)
                if pos is None:
                    torch.index_select(t.hbm.data, 0, idx, out=out)
                else:
                    out.index_copy_(0, torch.from_numpy(pos).to(device, non_blocking=True),
                                    t.hbm.data.index_select(0, idx))
            result = _shaped(plan, out)
            event = torch.cuda.Event()
            event.record(side_stream)
        return result, event
    return _shaped(plan, out), event


def _shaped(plan, out: torch.Tensor) -> torch.Tensor:
    info = plan.t.info
    rows = out.view(info.dtype).reshape(*plan.shape, info.dim)
    if plan.decode and info.row_format is not None:
        rows = DECODERS[info.row_format](rows)
    return rows
