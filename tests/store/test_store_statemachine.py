"""Hypothesis state machine: prefetch / wait / lookup / update / drop interleaved on random tables
(dims 1..128, float32 / float16 / bfloat16, up to ~100k rows) under random budgets (zero HBM,
zero DRAM, everything fits, in between), every returned row checked bit-for-bit against a dense
reference tensor (zarr's ZarrStoreStateMachine pattern).

Semantics checked: a handle returns the table as it was when prefetch was called.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import engram_store

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_TABLE_BYTES = 2_000_000  # keeps the default run fast; rows still reach ~100k for small dims


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@st.composite
def table_spec(draw):
    dim = draw(st.integers(1, 128))
    dtype = draw(st.sampled_from(DTYPES))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    max_rows = max(1, min(100_000, MAX_TABLE_BYTES // (dim * itemsize)))
    rows = draw(st.one_of(st.integers(1, 64), st.integers(1, max_rows)))
    return rows, dim, dtype


def budget(draw, total: int) -> int:
    kind = draw(st.sampled_from(["zero", "all", "between", "tiny"]))
    if kind == "zero":
        return 0
    if kind == "all":
        return 2 * total
    if kind == "tiny":
        return draw(st.integers(0, 512))
    return draw(st.integers(0, total))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="engram-sm-"))
        self.store = None
        self.handles: list[tuple[engram_store.Handle, torch.Tensor]] = []

    @initialize(data=st.data())
    def open_store(self, data):
        draw = data.draw
        n_tables = draw(st.integers(1, 2))
        specs = [draw(table_spec()) for _ in range(n_tables)]
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        self.ref: dict[str, torch.Tensor] = {}
        order = {}
        for i, (rows, dim, dtype) in enumerate(specs):
            name = f"layer{i + 1}"
            self.ref[name] = torch.randn(rows, dim, generator=g).to(dtype)
            if draw(st.booleans()):
                order[name] = torch.randperm(rows, generator=g)
        backend = draw(st.sampled_from(["mmap", "lmdb"]))
        block_bytes = draw(st.sampled_from([None, 64, 1000]))
        path = engram_store.write(self.tmp / "s", self.ref, order, backend=backend, block_bytes=block_bytes)
        total = sum(t.numel() * t.element_size() for t in self.ref.values())
        hbm, dram = budget(draw, total), budget(draw, total)
        self.store = engram_store.open(path, device="cpu", hbm_bytes=hbm, dram_bytes=dram,
                                       io_threads=draw(st.sampled_from([1, 3, 8])))

    def _ids(self, data, name):
        rows = self.ref[name].shape[0]
        shape = data.draw(st.sampled_from([(), (1,), (7,), (3, 5), (64,), (300,)]))
        hot = data.draw(st.booleans())
        hi = max(1, rows // 10) if hot else rows
        n = int(np.prod(shape)) if shape else 1
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        return torch.randint(0, hi, shape if shape else (n,), generator=g)

    def _check(self, got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(_bits(got), _bits(want)), "a returned row differs from the reference"

    @rule(data=st.data())
    def prefetch(self, data):
        name = data.draw(st.sampled_from(sorted(self.ref)))
        ids = self._ids(data, name)
        self.handles.append((self.store.prefetch(name, ids), self.ref[name][ids].clone()))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def wait(self, data):
        i = data.draw(st.integers(0, len(self.handles) - 1))
        h, want = self.handles.pop(i)
        self._check(h.wait(), want)
        if data.draw(st.booleans()):
            self._check(h.wait(), want)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def drop(self, data):
        i = data.draw(st.integers(0, len(self.handles) - 1))
        self.handles.pop(i)
        gc.collect()

    @rule(data=st.data())
    def lookup(self, data):
        name = data.draw(st.sampled_from(sorted(self.ref)))
        ids = self._ids(data, name)
        self._check(self.store.lookup(name, ids), self.ref[name][ids])

    @rule(data=st.data())
    def update(self, data):
        name = data.draw(st.sampled_from(sorted(self.ref)))
        ids = self._ids(data, name)
        ref = self.ref[name]
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        vals = torch.randn(*ids.shape, ref.shape[1], generator=g).to(ref.dtype)
        self.store.update(name, ids, vals)
        flat_ids, flat_vals = ids.reshape(-1).tolist(), vals.reshape(-1, ref.shape[1])
        for k, r in enumerate(flat_ids):  # last occurrence wins, by construction
            ref[r] = flat_vals[k]

    @invariant()
    def pins_never_exceed_outstanding(self):
        if self.store is None:
            return
        for t in self.store._t.values():
            assert (t.dram.policy.pins >= 0).all()

    def teardown(self):
        try:
            if self.store is not None:
                for h, want in self.handles:
                    self._check(h.wait(), want)
                self.handles.clear()
                gc.collect()
                # A dropped handle's pins are released when its read finishes (a done-callback
                # queues the release, the next store call drains it): wait for that, boundedly.
                deadline = time.monotonic() + 10.0
                while True:
                    self.store.stats()  # drains queued releases
                    pinned = sum(int(t.dram.policy.pins.sum()) for t in self.store._t.values())
                    if pinned == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
                assert pinned == 0, "a handle's pins were never released"
                self.store.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=25, stateful_step_count=15, **_common)


@pytest.mark.slow
def test_store_machine_long():
    from hypothesis.stateful import run_state_machine_as_test
    run_state_machine_as_test(StoreMachine, settings=settings(max_examples=300, stateful_step_count=40, **_common))
