"""Pending rows: the one protocol every prefetch returns (store, sharded store, in-memory table).

``Pending``: ``wait()`` gives the rows, ``done()`` says whether it would block, and
``add_done_callback(fn)`` calls ``fn()`` once the rows are ready or failed (at once if they are).
:class:`Handle` is the store's (rows being read on its pools); :class:`Ready` one whose rows are
already there or computed on the caller's thread at ``wait()``.

A handle holds the DRAM slots its rows occupy (the lookahead guarantee: no later
prefetch can evict them). The hold is released exactly once: by the first ``wait()``
(whether it returns or raises), or, for a handle dropped without ``wait()``, when it is
garbage-collected *and* its I/O has finished (released through a queue the store drains
under its lock, so garbage collection never takes the lock).

A prefetch served inside ``prefetch()`` gets a :class:`Done` instead of a ``Future``: a decoding
step makes one per Engram layer per token, and a ``Future``'s condition variable and a
``weakref.finalize`` per handle were a third of such a prefetch's cost.

Thread-safety: ``wait()`` and ``done()`` may be called from any thread, and more than once;
every ``wait()`` returns the same tensor.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Pending(Protocol):
    def wait(self) -> torch.Tensor:
        """The rows, ``Tensor[*row_ids.shape, dim]`` (blocks until ready)."""

    def done(self) -> bool:
        """True when ``wait()`` would not block."""

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once the rows are ready or failed (at once if they are)."""


class Ready:
    """Rows that are already there (``value``) or computed on the caller's thread at the first ``wait()``
    (``fn``): never blocks on I/O."""

    __slots__ = ("_fn", "_value")

    def __init__(self, value: torch.Tensor | None = None, fn: Callable[[], torch.Tensor] | None = None) -> None:
        if (value is None) == (fn is None):
            raise TypeError("Ready takes a value or a function, not both")
        self._fn, self._value = fn, value

    def done(self) -> bool:
        return True

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        fn()

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        if self._value is None:
            self._value = self._fn()
            self._fn = None
        return self._value


def _release_when_done(future: Future, queue_release) -> None:
    future.add_done_callback(lambda _f: queue_release())


class Handle:
    """Pending rows of one prefetch. See the module docstring for the release rules."""

    def __init__(self, future, release_now, queue_release, stats) -> None:
        self._future = future
        self._release_now = release_now
        self._queue_release = queue_release
        self._stats = stats
        self._synced = False
        self._hold = [True]  # popped exactly once (list.pop is atomic): by the first wait() or by __del__

    def _take_hold(self) -> bool:
        try:
            self._hold.pop()
        except IndexError:
            return False
        return True

    def __del__(self) -> None:
        hold = getattr(self, "_hold", None)
        if hold and self._take_hold():  # dropped without wait(): release once its I/O has finished
            _release_when_done(self._future, self._queue_release)

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        self._future.add_done_callback(lambda _f: fn())

    def done(self) -> bool:
        if not self._future.done():
            return False
        if self._future.exception() is not None:
            return True
        event = self._future.result()[1]
        return event is None or event.query()

    def wait(self) -> torch.Tensor:
        """The rows, ``Tensor[*row_ids.shape, dim]`` on the store's device (blocks until ready)."""
        t0 = time.perf_counter()
        try:
            out, event = self._future.result()
        finally:
            if self._take_hold():
                self._release_now()
        if event is not None and not self._synced:
            stream = torch.cuda.current_stream(out.device)
            stream.wait_event(event)
            out.record_stream(stream)
            self._synced = True
        self._stats.record_wait(time.perf_counter() - t0)
        return out


class Done:
    """A future that finished with ``value``: the members ``Handle`` uses, without ``Future``'s lock."""

    __slots__ = ("_value",)

    def __init__(self, value) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None):
        return self._value

    def exception(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn) -> None:
        fn(self)


def done_future(value) -> Done:
    return Done(value)
