"""Serving an Engram model from a tiered store instead of from its in-memory tables.

    model, store = load_served("ckpt", "store", device="cpu", dram_bytes=..., hbm_bytes=...)
    logits = model(input_ids)       # hashes once, prefetches every Engram layer, waits at each
    store.close()

``load_served`` loads the checkpoint, opens the store with the checkpoint's hash-config
fingerprint (a store built for another hash config, tokenizer or seed is refused with
:class:`FingerprintMismatchError`), and swaps every Engram layer's trainable table for a
:class:`ServedTable`: a read-only view of the store's table. The rows keep the store's dtype
until the Engram module casts them to the hidden state's dtype (``emb.to(hidden.dtype)``), so
a float16 / bfloat16 store gives exactly the model whose table was cast the same way.

Every served table shares one :class:`FetchTimer`, which records per prefetch the time spent
issuing it (on the caller's thread), the time until its rows were ready (host side: disk
reads, gathers and the launch of the device copy) and the time ``wait()`` blocked. From
these the benchmark reports how much of the fetch time was hidden behind compute.
"""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import engram_store
from engram_model.checkpoint import load_checkpoint
from engram_store.errors import EngramStoreError, FingerprintMismatchError, UnknownTableError
from engram_model.memory import table_name


class ReadOnlyTableError(EngramStoreError, PermissionError):
    """An update through a table that is served read-only."""


@dataclass
class FetchTimer:
    """Per-prefetch timings (seconds) of every table that shares it. Thread-safe."""

    issue_s: float = 0.0  # inside prefetch() on the caller's thread (critical path)
    fetch_s: float = 0.0  # prefetch() start -> rows ready on the host side (sum over prefetches)
    wait_s: float = 0.0  # blocked inside wait() (critical path)
    hidden_s: float = 0.0  # per prefetch: max(0, fetch - issue - wait), the part overlapped with compute
    prefetches: int = 0
    waits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        with self.lock:
            self.issue_s = self.fetch_s = self.wait_s = self.hidden_s = 0.0
            self.prefetches = self.waits = 0

    def add(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    # the two per-prefetch records, written out: a decoding step makes one prefetch per Engram layer
    def add_issue(self, issue_s: float) -> None:
        with self.lock:
            self.issue_s += issue_s
            self.prefetches += 1

    def add_wait(self, wait_s: float, fetch_s: float, hidden_s: float) -> None:
        with self.lock:
            self.wait_s += wait_s
            self.fetch_s += fetch_s
            self.hidden_s += hidden_s
            self.waits += 1

    def summary(self) -> dict:
        """Totals and the hidden fraction: the share of fetch time that was not on the critical path
        (not inside prefetch() and not blocked in wait()), i.e. overlapped with compute."""
        with self.lock:
            return {"prefetches": self.prefetches, "waits": self.waits, "issue_s": self.issue_s,
                    "fetch_s": self.fetch_s, "wait_s": self.wait_s, "hidden_s": self.hidden_s,
                    "hidden_fraction": self.hidden_s / self.fetch_s if self.fetch_s > 0 else 0.0}


class TimedPending:
    """A store handle (or the future of one being issued) plus timings; ``wait()`` gives the rows."""

    __slots__ = ("_handle", "_issuing", "_timer", "_t0", "_issue", "_ready", "_waited")

    def __init__(self, timer: FetchTimer, t0: float) -> None:
        self._timer, self._t0 = timer, t0
        self._handle = self._issuing = self._ready = None
        self._issue = 0.0
        self._waited = False

    def _attach(self, handle):
        """Called with the store's handle right after ``store.prefetch`` returned."""
        self._handle = handle
        handle.add_done_callback(self._on_ready)
        return handle

    def _on_ready(self) -> None:
        self._ready = time.perf_counter()

    def done(self) -> bool:
        if self._handle is None:
            return False
        return self._handle.done()

    def add_done_callback(self, fn) -> None:
        if self._handle is not None:
            self._handle.add_done_callback(fn)
        else:  # still being issued on the issue thread
            self._issuing.add_done_callback(lambda f: f.result().add_done_callback(fn))

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        handle = self._handle if self._issuing is None else self._issuing.result()
        out = handle.wait()
        t1 = time.perf_counter()
        if not self._waited:
            self._waited = True
            fetch = (self._ready if self._ready is not None else t1) - self._t0
            self._timer.add_wait(t1 - t0, fetch, max(0.0, fetch - self._issue - (t1 - t0)))
        return out


class ServedTable:
    """One Engram layer's table served by a store: engram_model's ``MemoryTable``, read-only.

    With an ``issuer`` (a one-thread executor shared by the tables of one store), ``prefetch``
    hands the store's planning (dedupe, tier split, cache policy, and an all-resident gather)
    to that thread and returns after copying the ids to the host; prefetches still reach the
    store in issue order. Errors of the prefetch then surface at ``wait()``.
    """

    def __init__(self, store, name: str, timer: FetchTimer | None = None, issuer=None) -> None:
        self._view = store.table(name)
        self.store, self.name = store, name
        self.rows, self.dim, self.dtype = self._view.rows, self._view.dim, self._view.dtype
        self.timer = timer if timer is not None else FetchTimer()
        self.issuer = issuer

    def prefetch(self, row_ids: torch.Tensor) -> TimedPending:
        t0 = time.perf_counter()
        pending = TimedPending(self.timer, t0)
        if self.issuer is None:
            pending._attach(self._view.prefetch(row_ids))
        else:
            # The device-to-host copy of the ids stays on the caller's thread: there it waits only for
            # the hashing kernels; from another thread it would queue behind the blocks' kernels.
            ids = row_ids.detach().cpu() if isinstance(row_ids, torch.Tensor) else row_ids
            pending._issuing = self.issuer.submit(lambda: pending._attach(self._view.prefetch(ids)))
        pending._issue = time.perf_counter() - t0
        self.timer.add_issue(pending._issue)
        return pending

    def lookup(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self.prefetch(row_ids).wait()

    def update(self, row_ids, values) -> None:
        raise ReadOnlyTableError(
            f"table {self.name!r} is served read-only from {str(self.store.path)!r}: train with the in-memory "
            "tables (load_checkpoint) and rebuild the store, or call store.update() on a store you own"
        )

    def __repr__(self) -> str:
        return f"ServedTable({self.name!r}, rows={self.rows}, dim={self.dim}, dtype={self.dtype}, read-only)"


def serve_from_store(model, store, timer: FetchTimer | None = None, async_issue: bool = False) -> FetchTimer:
    """Swap every Engram layer of ``model`` for the store's table (checked against the fingerprint).

    ``async_issue``: issue prefetches from a background thread (see :class:`ServedTable`).
    """
    if model.hash_config is None:
        raise EngramStoreError("this model has no Engram layers: there is nothing to serve from a store")
    if store.fingerprint != model.fingerprint:
        raise FingerprintMismatchError(
            f"store {str(store.path)!r} was built for hash-config fingerprint {store.fingerprint!r}, but the model's "
            f"is {model.fingerprint!r}: rebuild the store from this checkpoint (engram-store build)"
        )
    timer = timer if timer is not None else FetchTimer()
    issuer = None
    if async_issue:
        issuer = ThreadPoolExecutor(1, thread_name_prefix="engram-issue")
        weakref.finalize(store, issuer.shutdown, wait=False)
    tables = {}
    for L in model.config.engram_layers:
        name = table_name(L)
        if name not in store.tables:
            raise UnknownTableError(f"store {str(store.path)!r} has no table {name!r} (it holds {sorted(store.tables)})")
        tables[L] = ServedTable(store, name, timer, issuer)
    model.set_memory(tables)
    model.serving_timer = timer
    return timer


def load_served(checkpoint_dir, store_dir, *, device="cpu", hbm_bytes: int = 0, dram_bytes: int = 0,
                backend: str | None = None, async_issue: bool = False, **open_kw):
    """``(model, store)``: the checkpoint's model (eval mode, on ``device``) with its Engram tables
    served read-only by the store at ``store_dir``, opened on ``device`` with these tier budgets.

    ``async_issue``: issue prefetches from a background thread (see :class:`ServedTable`).
    Raises FingerprintMismatchError when the store was built for another hash config.
    The caller closes the store (``store.close()`` or ``with store: ...``).
    """
    ckpt = load_checkpoint(checkpoint_dir, map_location=device)
    if ckpt.fingerprint is None:
        raise EngramStoreError(f"checkpoint {str(checkpoint_dir)!r} has no Engram layers: nothing to serve")
    try:
        store = engram_store.open(store_dir, device=device, hbm_bytes=hbm_bytes, dram_bytes=dram_bytes,
                                  backend=backend, fingerprint=ckpt.fingerprint, **open_kw)
    except FingerprintMismatchError as exc:
        raise FingerprintMismatchError(
            f"checkpoint {str(checkpoint_dir)!r} cannot be served from this store: {exc}"
        ) from None
    try:
        serve_from_store(ckpt.model, store, async_issue=async_issue)
    except BaseException:
        store.close()
        raise
    return ckpt.model, store
