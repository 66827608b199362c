"""Concurrency: the workload of row_soak.py (threads prefetching / waiting / dropping / looking up /
updating under random small budgets; processes reading while one updates), run for every row codec:
plain float32 rows (here) and packed fp8 rows (test_reliability_quantized.py).

The float codec: row ``r`` of version ``v`` holds ``v * ROWS + r`` in every element, so a row from the
wrong id, a torn row (two versions) and a stale row are all visible; the reference is that number,
recomputed. ``soak_threads`` / ``soak_processes`` (float rows) are what ``bench/reliability_soak.py``
runs for minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import row_soak
from row_soak import ROWS, Read, RowCodec
from test_reliability_quantized import FP8_ROWS

pytestmark = pytest.mark.reliability

DIM = 8  # versions < 16384 keep v * ROWS + r exact in float32


def encode(ids: np.ndarray, versions: np.ndarray) -> torch.Tensor:
    val = versions.astype(np.float64) * ROWS + ids
    return torch.from_numpy(np.repeat(val[:, None], DIM, axis=1).astype(np.float32))


def decode(ids: np.ndarray, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(versions, ok): ok[i] is False for a torn row or a row of another id."""
    a = rows.reshape(-1, DIM).numpy().astype(np.int64)
    whole = (a == a[:, :1]).all(axis=1)
    v, r = np.divmod(a[:, 0], ROWS)
    return v, whole & (r == ids.reshape(-1))


FLOAT_ROWS = RowCodec("float32", torch.float32, DIM, None, encode, (Read("rows", {}, DIM, decode),))


def soak_threads(tmp: Path, backend: str, seconds: float, **kw) -> dict:
    """row_soak.soak_threads on float rows."""
    return row_soak.soak_threads(tmp, FLOAT_ROWS, backend, seconds, **kw)


def soak_processes(tmp: Path, backend: str, seconds: float, **kw) -> dict:
    """row_soak.soak_processes on float rows."""
    return row_soak.soak_processes(tmp, FLOAT_ROWS, backend, seconds, **kw)


# The short runs per codec: (codec, seconds, reader threads, epoch_s) and how much a run must at least have
# done (updates, rows checked) to count. fp8 rows are checked slower (every row re-derived, dequantized
# ones through the reference decoding), hence their shorter runs and lower floors.
THREAD_RUNS = [pytest.param(FLOAT_ROWS, 4.0, 6, 2.0, 20, 10000, id="float32"),
               pytest.param(FP8_ROWS, 3.0, 4, 1.5, 5, 1000, id="fp8")]
PROCESS_RUNS = [pytest.param(FLOAT_ROWS, 3.0, 10, id="float32"), pytest.param(FP8_ROWS, 2.5, 5, id="fp8")]
LONG_RUNS = [pytest.param(FLOAT_ROWS, 120.0, 12, 10.0, 60.0, id="float32"),
             pytest.param(FP8_ROWS, 60.0, 8, 6.0, 30.0, id="fp8")]


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("codec, seconds, readers, epoch_s, least_updates, least_rows", THREAD_RUNS)
def test_threads_prefetch_wait_lookup_update(tmp_path, codec, seconds, readers, epoch_s, least_updates, least_rows,
                                             backend):
    r = row_soak.soak_threads(tmp_path, codec, backend, seconds, readers=readers, epoch_s=epoch_s, seed=1)
    print(f"\nRELIABILITY concurrency threads: {r}")
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert r["updates"] > least_updates and r["rows_checked"] > least_rows  # it did run


@pytest.mark.parametrize("backend", ["lmdb", "mmap"])
@pytest.mark.parametrize("codec, seconds, least_updates", PROCESS_RUNS)
def test_processes_read_while_one_updates(tmp_path, codec, seconds, least_updates, backend):
    r = row_soak.soak_processes(tmp_path, codec, backend, seconds, readers=3, seed=2)
    print(f"\nRELIABILITY concurrency processes: {r}")
    assert not r["errors"], r["errors"]
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert r["updates"] > least_updates and r["reads"] > 10


@pytest.mark.reliability_long
@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("codec, thread_s, readers, epoch_s, process_s", LONG_RUNS)
def test_threads_and_processes_long(tmp_path, codec, thread_s, readers, epoch_s, process_s, backend):
    r = row_soak.soak_threads(tmp_path, codec, backend, thread_s, readers=readers, updaters=3, epoch_s=epoch_s, seed=5)
    p = row_soak.soak_processes(tmp_path, codec, backend, process_s, readers=4, seed=6)
    print(f"\nRELIABILITY concurrency long: threads {r} processes {p}")
    assert r["wrong_rows"] == 0 and r["lost_updates"] == 0
    assert not p["errors"] and p["wrong_rows"] == 0 and p["lost_updates"] == 0
