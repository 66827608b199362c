"""Small disk reads served inside ``prefetch()`` on the caller's thread (``inline_reads``).

The same prefetches run on a store that reads small misses inline and on one that sends every
read to its pools (``inline_reads=0``): rows equal the dense tensor and each other, the stats
agree, the inline reads ran on the caller's thread and the pooled ones did not, and a failed
inline read surfaces at ``wait()`` and leaves no slot holding bytes it never read.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_store
from engram_store.errors import EngramStoreError, StoreCorruptError

ROWS, DIM, CACHED = 3000, 8, 200


class RecordingDisk:
    """Wraps a disk backend: records the thread of every ``read`` and can fail the next one."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.threads: list[int] = []
        self.fail_next = False

    def read(self, table, ranks, **kw):
        self.threads.append(threading.get_ident())
        if self.fail_next:
            self.fail_next = False
            raise StoreCorruptError("injected: block checksum mismatch")
        return self.inner.read(table, ranks, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _open(path, **kw):
    s = engram_store.open(path, device="cpu", dram_bytes=CACHED * DIM * 4, **kw)
    s._disk = RecordingDisk(s._disk)
    return s


def _counts(stats: dict) -> dict:
    return {k: v for k, v in stats["t"].items() if k != "wait_ms"}


@pytest.fixture(params=["mmap", "lmdb"])
def table(request, tmp_path):
    T = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    return T, Path(engram_store.write(tmp_path / "s", {"t": T}, backend=request.param))


def test_inline_and_pooled_reads_give_the_same_rows_and_stats(table):
    T, path = table
    rng = np.random.default_rng(1)
    # decode-sized batches with repeats (hits, a few misses), and larger ones past the inline limit
    batches = [rng.integers(0, ROWS, size=int(rng.choice([1, 7, 32, 600]))) for _ in range(60)]
    batches += [rng.integers(0, 150, size=(4, 8))]  # warm ranks only: all hits
    me = threading.get_ident()
    twin = shutil.copytree(path, path.parent / "twin")  # an LMDB store opens once per process
    with _open(path) as inline, _open(twin, inline_reads=0) as pooled:
        for ids in batches:
            want = T[torch.from_numpy(ids)]
            before = len(inline._disk.threads)
            a = inline.prefetch("t", ids)
            if me in inline._disk.threads[before:]:
                assert a.done()  # the inline read finished inside prefetch()
            got_a = a.wait()
            b = pooled.prefetch("t", ids).wait()
            assert torch.equal(got_a, want) and torch.equal(b, want)
            assert _counts(inline.stats()) == _counts(pooled.stats())
        assert me in inline._disk.threads, "no read ran inline"
        assert any(t != me for t in inline._disk.threads), "a read past the limit ran inline"
        assert me not in pooled._disk.threads, "inline_reads=0 read on the caller's thread"
        st = inline.stats()["t"]
        assert st["disk"]["reads"] > 0 and st["dram"]["hits"] > 0 and st["dram"]["evictions"] > 0


def test_failed_inline_read_surfaces_at_wait_and_forgets_its_slots(table):
    T, path = table
    ids = np.array([2000, 2001, 2500, 5])  # three misses (ranks past the warm DRAM rows), one hit
    with _open(path) as s:
        s._disk.fail_next = True
        h = s.prefetch("t", ids)  # no raise here: the error belongs to wait(), as a pooled job's does
        assert s._disk.threads == [threading.get_ident()]
        with pytest.raises(StoreCorruptError, match="injected"):
            h.wait()
        assert s.stats()["t"]["failures"] == 1
        # the slots the failed read was filling hold no bytes: the same rows are read again, right
        assert torch.equal(s.prefetch("t", ids).wait(), T[torch.from_numpy(ids)])
        assert len(s._disk.threads) == 2
        assert int(s._t["t"].dram.policy.pins.sum()) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_inline_reads_is_refused(tmp_path, bad):
    path = engram_store.write(tmp_path / "s", {"t": torch.zeros(10, 4)})
    with pytest.raises(EngramStoreError, match="inline_reads"):
        engram_store.open(path, device="cpu", inline_reads=bad)
