"""The DRAM slab read by the device: a CUDA view of the pinned slab over unified virtual addressing (UVA).

Why: gathering every DRAM-hit row on the host into a pinned buffer and copying the buffer up
costs the host a random-row copy per prefetch (+95% forward overhead on an H100). A GPU can
read pinned host memory itself, so the device gathers the DRAM rows straight out of the slab,
with the slot indices the host already knows, on the store's side stream; the host only reads
misses from disk into their slots (as vLLM serves DeepSeek-V4.1's tables from pinned memory).

* :func:`cuda_view` -- a CUDA tensor aliasing the pinned slab (the CUDA-only seam: ctypes to the
  libcudart that torch loaded, then ``__cuda_array_interface__``). torch's ``from_blob`` under
  ``torch.as_tensor`` asks CUDA which device owns the pointer (``cudaPointerGetAttributes``) and
  refuses plain host memory, so only registered (pinned) memory gets through.
* :func:`self_check` -- gathers sampled slots through the view and compares them with the host's
  bytes; :func:`attach` runs it at store open and falls back to the host gather, with a
  :class:`UvaFallbackWarning`, when the view cannot be made or disagrees (never wrong rows).
* :class:`PendingReads` -- a plan's slot holds outlive its ``wait()`` until the device has
  finished reading the slots (the gather's event), so no later load can overwrite a slot the
  device is still reading.

On a CPU store ``uva=True`` makes the slab its own "view": the DRAM rows are then gathered by
the same torch code that runs on the GPU (``assemble``'s device branch), which is how CI, with
no GPU, exercises that path against the host gather and a dense reference.
"""

from __future__ import annotations

import collections
import ctypes
import warnings

import numpy as np
import torch

from engram_store.errors import EngramStoreError

# slots gathered by the self-check at open: enough to cross every 2 MiB huge page of a small
# slab and to sample a large one from end to end, little enough to cost nothing at open
_CHECK_SLOTS = 256


class UvaFallbackWarning(RuntimeWarning):
    """The device cannot read the DRAM slab over UVA here: the store gathers DRAM rows on the host."""


class UvaUnavailable(EngramStoreError):
    """A CUDA view of the pinned slab could not be made (see the message for why)."""


def check_option(uva) -> None:
    if uva is not None and not isinstance(uva, bool):
        raise EngramStoreError(f"uva must be True, False or None (the default: on for a CUDA store), got {uva!r}")


# -- the CUDA-only seam ------------------------------------------------------------------------

def _loaded_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library torch itself loaded (found in this process's mappings), or None
    (a torch that links it statically, or a system without /proc)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: dlopen hands back the same library
            fn = lib.cudaHostGetDevicePointer
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_uint]
        return lib
    return None


def _device_pointer(host_ptr: int, device: torch.device) -> tuple[int, str]:
    """``(device address of the pinned host address, how it was obtained)``."""
    lib = _loaded_cudart()
    if lib is None:
        # under UVA (every 64-bit Linux CUDA context) memory from cudaHostAlloc, torch's pinned
        # allocator, has the same address on the device; the self-check confirms it
        return host_ptr, "host pointer (no libcudart found in the process)"
    out = ctypes.c_void_p()
    with torch.cuda.device(device):
        err = lib.cudaHostGetDevicePointer(ctypes.byref(out), ctypes.c_void_p(host_ptr), 0)
    if err != 0 or not out.value:
        raise UvaUnavailable(f"cudaHostGetDevicePointer failed (cudaError {err}) for the pinned DRAM slab")
    return int(out.value), "cudaHostGetDevicePointer"


class _Interface:
    """Just enough of ``__cuda_array_interface__`` (v2) for torch to alias memory; it keeps the slab
    alive for as long as the view is (torch holds this object until the view is freed)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str, keep) -> None:
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "typestr": typestr,
                                         "strides": None, "version": 2}
        self._keep = keep


def cuda_view(slab: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, str]:
    """``(CUDA tensor aliasing the pinned ``slab``, how its address was obtained)``; UvaUnavailable if not."""
    if slab.device.type != "cpu" or not slab.is_pinned() or not slab.is_contiguous():
        raise UvaUnavailable("the DRAM slab is not a contiguous pinned host tensor")
    dptr, how = _device_pointer(slab.data_ptr(), device)

    def alias(rows: int) -> torch.Tensor:
        iface = _Interface(dptr, (rows, slab.shape[1]), "|u1", slab)
        try:
            v = torch.as_tensor(iface, device=device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise UvaUnavailable(f"torch would not alias the slab's device address: {e}") from e
        # torch.as_tensor copies when the pointer belongs to another device: an alias or nothing
        if v.device != device or v.data_ptr() != dptr:
            raise UvaUnavailable(f"torch placed the slab's address on {v.device}, not {device} (a copy, not a view)")
        return v

    alias(1)  # a one-row probe first: a refused alias must not cost a copy of the whole slab
    return alias(slab.shape[0]), how


# -- device-independent: the self-check and the holds ---------------------------------------------

def check_slots(capacity: int, n: int = _CHECK_SLOTS) -> np.ndarray:
    """Slots the self-check reads: both ends and an even spread between, in a scrambled order (a
    view that mixed up indices or ignored them would then disagree)."""
    if capacity <= 0:
        return np.empty(0, np.int64)
    slots = np.unique(np.linspace(0, capacity - 1, min(n, capacity)).astype(np.int64))
    return np.random.default_rng(capacity).permutation(slots)


def self_check(slab: torch.Tensor, view: torch.Tensor, device: torch.device) -> str | None:
    """None when rows gathered through ``view`` on ``device`` equal the slab's host bytes, else why not."""
    slots = check_slots(slab.shape[0])
    if not slots.size:
        return None
    try:
        got = torch.index_select(view, 0, torch.from_numpy(slots).to(device)).cpu()
    except RuntimeError as e:
        return f"gathering through the view failed: {e}"
    want = slab.index_select(0, torch.from_numpy(slots))
    if not torch.equal(got, want):
        bad = int((got != want).any(dim=1).sum())
        return f"{bad} of {slots.size} sampled slots read through the view differ from the host bytes"
    return None


def attach(dram, device: torch.device, uva: bool | None, table: str) -> str:
    """Let the device gather ``dram``'s rows when ``uva`` asks for it and it works; returns the mode:
    "uva" (a CUDA view of the slab), "host-view" (CPU, ``uva=True``: the slab gathered by the
    device code path), or "host" (the host gathers DRAM rows)."""
    check_option(uva)
    if dram.capacity == 0 or uva is False or (uva is None and device.type != "cuda"):
        return "host"
    if device.type != "cuda":
        dram.set_device_rows(dram.slab)
        return "host-view"
    try:
        view, how = cuda_view(dram.slab, device)
        why = self_check(dram.slab, view, device)
    except UvaUnavailable as e:
        why = str(e)
    if why is not None:
        warnings.warn(f"table {table!r}: the GPU cannot read the DRAM tier over UVA ({why}); its DRAM rows "
                      f"are gathered on the host and copied up instead (correct, slower). Open the store with "
                      f"uva=False to silence this.", UvaFallbackWarning, stacklevel=3)
        return "host"
    dram.set_device_rows(view, how)
    return "uva"


class PendingReads:
    """Plans whose DRAM slots a device gather may still be reading when their holds would end.

    A handle's ``wait()`` on CUDA does not block the host: it only makes the caller's stream wait
    for the gather's event. The host must not let the slots go then, since a later prefetch could
    evict one and its disk load overwrite the slot while the device still reads it; so a plan
    with a ``reading`` event that has not completed is parked here and released once the event
    has. Store lock held for every method.
    """

    def __init__(self) -> None:
        self._parked: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self._parked)

    def release(self, plan, loads) -> None:
        event = getattr(plan, "reading", None)
        if event is not None and not event.query():
            self._parked.append(plan)
        else:
            plan.release(loads)

    def drain(self, loads) -> None:
        """Release the parked plans whose device reads have finished."""
        if not self._parked:
            return
        keep = collections.deque()
        for plan in self._parked:
            if plan.reading.query():
                plan.release(loads)
            else:
                keep.append(plan)
        self._parked = keep
