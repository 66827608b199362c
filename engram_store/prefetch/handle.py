"""The handle a prefetch returns: ``wait()`` gives the rows, ``done()`` says whether it would block.

A handle holds pins on the DRAM slots its rows occupy (the lookahead guarantee: no later
prefetch can evict them). The pins are released exactly once: by the first ``wait()``
(whether it returns or raises), or, for a handle dropped without ``wait()``, when it is
garbage-collected *and* its I/O has finished (released through a queue the store drains
under its lock, so garbage collection never takes the lock).

Thread-safety: ``wait()`` and ``done()`` may be called from any thread, and more than once;
every ``wait()`` returns the same tensor.
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import Future

import torch


def _release_when_done(future: Future, queue_release) -> None:
    future.add_done_callback(lambda _f: queue_release())


class Handle:
    """Pending rows of one prefetch. See the module docstring for the release rules."""

    def __init__(self, future: Future, release_now, queue_release, stats) -> None:
        self._future = future
        self._release_now = release_now
        self._stats = stats
        self._synced = False
        self._finalizer = weakref.finalize(self, _release_when_done, future, queue_release)

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
            if self._finalizer.detach() is not None:
                self._release_now()
        if event is not None and not self._synced:
            stream = torch.cuda.current_stream(out.device)
            stream.wait_event(event)
            out.record_stream(stream)
            self._synced = True
        self._stats.record_wait(time.perf_counter() - t0)
        return out


def done_future(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
