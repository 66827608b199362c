"""The last step of a prefetch: every row into ``[*shape, dim]`` on the store's device.

Host rows (DRAM slab, disk misses, and HBM rows when the "HBM" tier is host memory) are gathered
into the plan's host buffer. On CUDA that buffer is pinned and copied up on the store's side
stream, and the rows of the tiers the device reads itself are gathered there: HBM rows from the
device tensor and, over UVA, DRAM rows straight from the pinned slab (``resident.uva``) with the
slots the plan names. The event recorded on the side stream is what ``Handle.wait`` makes the
caller's stream wait for, and what a plan's slot holds last until (``uva.PendingReads``). Rows of
a table with a row format are decoded there too (``plan.decode``), on the device, after the
gather: the table is never decoded whole.

The device branch runs on a CPU store too (``uva=True``: the slab is its own "view"), so the
positions, slots, duplicates and holds of the device gather are exercised without a GPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from engram_store.format import fp8_rows
from engram_store.resident.dram import rows_view
from engram_store.resident.table import DISK, DRAM, HBM

# row format -> its decoder (packed rows [..., row_bytes] -> values [..., values])
DECODERS = {fp8_rows.FORMAT_NAME: fp8_rows.dequantize}
# the widest integer dtype whose size divides a row: the device gathers rows in these words (one
# uint8 per thread would read pinned host memory over PCIe in 32-byte pieces)
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def assemble(plan, miss_rows: np.ndarray | None, device: torch.device, side_stream) -> tuple[torch.Tensor, object]:
    """``(rows, event or None)`` for ``plan``; ``miss_rows``: the rows its disk read returned, in miss order."""
    t = plan.t
    parts = plan.parts
    on_cuda = device.type == "cuda"
    if not parts and not on_cuda:  # every row already in the host buffer (the hit pass copied them)
        out, plan.out = plan.out, None
        return _shaped(plan, out), None
    # host sources as row-item views (dram.rows_view): np.take copies whole rows, one thread
    sources = {HBM: t.hbm.host_rows, DRAM: t.dram.slab_rows}
    if miss_rows is not None:
        sources[DISK] = rows_view(np.ascontiguousarray(miss_rows))
    out, plan.out = plan.out, None  # a handle keeps its plan until released: do not keep the host copy too
    device_rows = _device_sources(t, on_cuda)
    if device_rows:
        return _assemble_on_device(plan, parts, sources, device_rows, out, device, side_stream)
    _host_gather(sources, rows_view(out.numpy()), parts)
    return _shaped(plan, out), None


def _host_gather(sources: dict, out_rows: np.ndarray, parts) -> None:
    for c, pos, idx in parts:
        # mode="clip" only skips numpy's buffered bounds check: every index is in range by
        # construction (ranks < H, slots from the policy >= 0, miss positions < len(miss_rows))
        if pos is None:
            np.take(sources[c], idx, out=out_rows, mode="clip")
        else:
            out_rows[pos] = np.take(sources[c], idx, mode="clip")


def _device_sources(t, on_cuda: bool) -> dict:
    """The tiers whose rows the device gathers itself, and the tensor it reads each from."""
    rows = {}
    if on_cuda:
        rows[HBM] = t.hbm.data
    if t.dram.device_gathered:
        rows[DRAM] = t.dram.device_rows
    return rows


def _assemble_on_device(plan, parts, sources, device_rows, out, device, side_stream):
    on_cuda = device.type == "cuda"
    host = [part for part in parts if part[0] not in device_rows]
    # With the DRAM rows read by the device, the host rows (disk misses) are usually a few
    # positions: upload only those, packed at the front of the pinned buffer, and scatter them.
    packed = DRAM in device_rows and host and not (len(host) == 1 and host[0][1] is None)
    if packed:
        assert not plan.host_done  # the hit pass copies no row when the device gathers DRAM rows
        hpos = np.concatenate([pos for _, pos, _ in host])
        staged = rows_view(out.numpy())[:hpos.size]
        off = 0
        for c, pos, idx in host:
            np.take(sources[c], idx, out=staged[off: off + pos.size], mode="clip")
            off += pos.size
    elif host:
        _host_gather(sources, rows_view(out.numpy()), host)
    event = None
    reads_slab = False
    with torch.cuda.stream(side_stream) if on_cuda else contextlib.nullcontext():
        if packed:
            dst = torch.empty((plan.n, out.shape[1]), dtype=torch.uint8, device=device)
            word = _word(out.shape[1])
            dst.view(word).index_copy_(0, _upload(hpos, device),
                                       out[:hpos.size].to(device, non_blocking=True).view(word))
        elif not on_cuda:
            dst = out  # host rows are already in place; the "device" gathers write into it
        elif host or plan.host_done:
            dst = out.to(device, non_blocking=True)
        else:
            dst = torch.empty((plan.n, out.shape[1]), dtype=torch.uint8, device=device)
        for c, pos, idx in parts:
            if c in device_rows:
                _gather(device_rows[c], idx, pos, dst, device)
                reads_slab |= c == DRAM
        result = _shaped(plan, dst)
        if on_cuda:
            event = torch.cuda.Event()
            event.record(side_stream)
    if reads_slab and event is not None:
        # the plan's slot holds must outlive this gather, not just the handle's wait() (which
        # does not block the host): see uva.PendingReads
        plan.reading = event
    return result, event


def _word(row_bytes: int) -> torch.dtype:
    return next((dt for size, dt in _WORDS if row_bytes % size == 0), torch.uint8)


def _upload(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(a).to(device, non_blocking=True)


def _gather(rows: torch.Tensor, idx: np.ndarray, pos: np.ndarray | None, dst: torch.Tensor, device) -> None:
    """``dst[pos] = rows[idx]`` (``pos`` None: every position), on ``rows``' device, in whole words."""
    word = _word(rows.shape[1])
    src, out = rows.view(word), dst.view(word)
    i = _upload(idx, device)
    if pos is None:
        torch.index_select(src, 0, i, out=out)
    else:
        out.index_copy_(0, _upload(pos, device), src.index_select(0, i))


def _shaped(plan, out: torch.Tensor) -> torch.Tensor:
    info = plan.t.info
    rows = out.view(info.dtype).reshape(*plan.shape, info.dim)
    if plan.decode and info.row_format is not None:
        rows = DECODERS[info.row_format](rows)
    return rows
