"""Crash safety: kill -9 the writing process at random points; the old store must answer as before.

Each trial forks a child that writes in a loop (whole stores with ``overwrite``, journalled /
transactional updates, counts files) and reports every completed step through a pipe; the
parent kills it with SIGKILL after a random (seeded) delay, then checks against dense
references: the store answers exactly as after the last reported step or the one after it
(the step in flight either committed whole or not at all), and no leftover partial directory
opens as a store unless it is a whole, earlier version.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_store
from engram_store.errors import EngramStoreError

pytestmark = pytest.mark.reliability

ROWS, DIM = 3000, 8  # 2 tables x 96 KB: tiny, so trials are many and fast


def fork_and_kill(target, delay_s: float) -> list[int]:
    """Run ``target(report)`` in a forked child, SIGKILL it ``delay_s`` after it starts; returns the steps it reported.

    The delay counts from the child's own start signal, not from fork(): forking a large test
    process (torch, numba, earlier tests' memory) can take longer than the whole kill window.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            torch.set_num_threads(1)  # torch's OpenMP pool does not survive fork(); one thread needs none
            os.write(w, b"\x01")  # started
            target(lambda k: os.write(w, int(k).to_bytes(4, "little")))
        except BaseException:  # noqa: BLE001 - report through the exit code only
            code = 3
        os._exit(code)
    os.close(w)
    os.read(r, 1)  # b"" if the child died before starting: the exit-status check below reports it
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    # killed by us, not dead of an error before the kill
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child exited early: {status}"
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]


def version_tables(k: int) -> dict[str, torch.Tensor]:
    """Version ``k`` of a whole store: two tables, every value encodes (version, table, row, col)."""
    base = torch.arange(ROWS * DIM, dtype=torch.float32).reshape(ROWS, DIM)
    return {"a": base + k * 1e5, "b": ((base % 512) - (k % 1024)).half().float()}


def read_all(path) -> dict[str, torch.Tensor]:
    with engram_store.open(path, device="cpu", dram_bytes=1 << 16) as s:
        return {n: s.lookup(n, torch.arange(ROWS)).float() for n in s.tables}


def matches(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def check_leftovers(parent: Path, name: str, candidates: list[dict]) -> int:
    """Every ``.name.partial-*`` / ``.name.old-*`` either fails to open or is one whole version; removes them."""
    n = 0
    for d in parent.iterdir():
        if d.name.startswith(f".{name}."):
            n += 1
            try:
                got = read_all(d)
            except EngramStoreError:
                pass  # an incomplete directory is refused: good
            else:
                assert any(matches(got, c) for c in candidates), f"{d.name} opened as a store with wrong rows"
            shutil.rmtree(d)
    return n


def write_version(path, k: int, backend: str) -> None:
    t = version_tables(k)
    engram_store.write(path, {"a": t["a"], "b": t["b"].half()}, backend=backend, overwrite=True,
                       order={"a": torch.from_numpy(np.random.default_rng(k).permutation(ROWS))}, chunk_rows=500)


def overwrite_kill_trials(write, trials: int, rng, check) -> int:
    """kill -9 a child that overwrites the path with ``write(k)`` for k = start+1, start+2, ..., ``trials``
    times, each at a random point of about three whole writes. ``check(trial, start, last)`` (``start``: the
    version at the path before the trial, ``last``: the last one the child reported committed) inspects the
    path and returns the version found there. Returns the last such version."""
    write(0)
    t0 = time.perf_counter()
    write(0)
    one = time.perf_counter() - t0  # one whole write: kill anywhere in a few of them
    current = 0
    for trial in range(trials):
        start = current

        def child(report, start=start):
            for k in range(start + 1, start + 1000):
                write(k)
                report(k)

        done = fork_and_kill(child, float(rng.uniform(0.0, 3.0 * one)))
        current = check(trial, start, done[-1] if done else start)
    return current


def run_overwrite_trials(tmp: Path, backend: str, trials: int, seed: int) -> dict:
    """kill -9 during ``write(..., overwrite=True)`` of whole stores, ``trials`` times."""
    path = tmp / f"store-{backend}"
    leftovers = 0

    def check(trial, start, last):
        nonlocal leftovers
        got = read_all(path)  # the store must open and be whole
        if matches(got, version_tables(last)):
            current = last
        else:
            assert matches(got, version_tables(last + 1)), f"trial {trial}: store is neither version {last} nor {last + 1}"
            current = last + 1
        leftovers += check_leftovers(tmp, path.name, [version_tables(j) for j in range(start, current + 2)])
        return current

    current = overwrite_kill_trials(lambda k: write_version(path, k, backend), trials, np.random.default_rng(seed),
                                    check)
    return {"trials": trials, "survived": trials, "versions_committed": current, "leftover_dirs": leftovers}


def update_step(k: int) -> tuple[np.ndarray, torch.Tensor]:
    """Update ``k``: 64 rows over many blocks of table ``a`` set to ``-k``."""
    ids = np.random.default_rng(1000 + k).choice(ROWS, 64, replace=False)
    return ids, torch.full((64, DIM), -float(k))


def run_update_trials(tmp: Path, backend: str, trials: int, seed: int) -> dict:
    """kill -9 during ``store.update`` (mmap journal / LMDB transaction), ``trials`` times."""
    rng = np.random.default_rng(seed)
    path = tmp / f"upd-{backend}"
    write_version(path, 0, backend)
    ref = version_tables(0)
    refs = [ref["a"].clone()]  # refs[k] = table a after updates 1..k
    current = 0
    with engram_store.open(path, device="cpu") as s:
        t0 = time.perf_counter()
        s.update("a", *map(torch.as_tensor, update_step(1)))
        s.update("a", torch.from_numpy(update_step(1)[0]), refs[0][update_step(1)[0]])  # undo
        one = time.perf_counter() - t0

    def ref_at(k):
        while len(refs) <= k:
            j = len(refs)
            ids, vals = update_step(j)
            nxt = refs[-1].clone()
            nxt[torch.from_numpy(ids)] = vals
            refs.append(nxt)
        return refs[k]

    for trial in range(trials):
        start = current

        def child(report, start=start):
            with engram_store.open(path, device="cpu", dram_bytes=int(rng.integers(0, 4)) * 4096) as s:
                for k in range(start + 1, start + 100000):
                    ids, vals = update_step(k)
                    s.update("a", torch.from_numpy(ids), vals)
                    report(k)

        done = fork_and_kill(child, float(rng.uniform(0.0, 20.0 * one)))
        last = done[-1] if done else start
        got = read_all(path)
        assert torch.equal(got["b"], ref["b"]), "an update of table a changed table b"
        if torch.equal(got["a"], ref_at(last)):
            current = last
        else:
            assert torch.equal(got["a"], ref_at(last + 1)), (
                f"trial {trial}: table a is neither after update {last} nor {last + 1} (a torn update)")
            current = last + 1
        assert not (path / "journal").exists() and not (path / "journal.partial").exists()
    return {"trials": trials, "survived": trials, "updates_committed": current}


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_kill9_during_overwrite_leaves_a_whole_store(tmp_path, backend):
    r = run_overwrite_trials(tmp_path, backend, trials=10, seed=7)
    print(f"\nRELIABILITY crash overwrite {backend}: {r}")
    assert r["versions_committed"] > 0  # the kills did land after some commits, not only before


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_kill9_during_update_is_all_or_nothing(tmp_path, backend):
    r = run_update_trials(tmp_path, backend, trials=10, seed=11)
    print(f"\nRELIABILITY crash update {backend}: {r}")
    assert r["updates_committed"] > 0


@pytest.mark.reliability_long
@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_kill9_many_trials(tmp_path, backend):
    r1 = run_overwrite_trials(tmp_path, backend, trials=150, seed=70)
    r2 = run_update_trials(tmp_path, backend, trials=150, seed=110)
    print(f"\nRELIABILITY crash long {backend}: overwrite {r1} update {r2}")


def test_kill9_during_counts_save(tmp_path):
    """``engram-store count`` output: Counts.save is all-or-nothing under kill -9."""
    from engram_pipeline.counts import Counts

    def counts(k):
        return Counts("fp", {"layer1": np.arange(50000, dtype=np.int64) * k, "layer2": np.full(7, k, np.int64)},
                      tokens=k)

    out = tmp_path / "counts.npz"
    counts(0).save(out)
    rng = np.random.default_rng(5)
    current = 0
    for _ in range(30):
        start = current

        def child(report, start=start):
            for k in range(start + 1, start + 100000):
                counts(k).save(out)
                report(k)

        done = fork_and_kill(child, float(rng.uniform(0.0, 0.03)))
        last = done[-1] if done else start
        got = Counts.load(out)
        current = got.tokens
        assert current in (last, last + 1)
        for n, v in counts(current).tables.items():
            assert np.array_equal(got.tables[n], v)
    assert current > 0
    print(f"\nRELIABILITY crash counts-save: 30 trials, {current} saves committed")


def test_kill9_during_cli_build(tmp_path):
    """``engram-store build --overwrite`` killed at random points (real CLI processes): old or new store, whole."""
    from engram_pipeline.build import synthetic_rows

    out = tmp_path / "s"
    rows, dim = 20000, 16

    def build(seed):
        return [sys.executable, "-m", "engram_store_cli.cli", "build", "--synthetic-rows", str(rows), "--dim", str(dim),
                "--seed", str(seed), "-o", str(out), "--overwrite", "--no-progress"]

    repo = Path(__file__).resolve().parents[3]
    subprocess.run(build(0), check=True, cwd=repo, capture_output=True)
    expect = {s: synthetic_rows(s, np.arange(rows), dim) for s in (0, 1)}
    rng = np.random.default_rng(3)
    outcomes = []
    for trial in range(2):
        proc = subprocess.Popen(build(1 if trial % 2 == 0 else 0), cwd=repo, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(1.5, 3.5)))  # import takes most of it; some kills land in the write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with engram_store.open(out, device="cpu") as s:
            got = s.lookup("layer0", torch.arange(rows))
        which = [k for k, v in expect.items() if torch.equal(got, v)]
        assert len(which) == 1, "the store after a killed build is neither the old nor the new one"
        outcomes.append(which[0])
        for d in tmp_path.iterdir():
            if d.name.startswith(".s."):
                try:
                    with engram_store.open(d, device="cpu") as s:
                        left = s.lookup("layer0", torch.arange(rows))
                except EngramStoreError:
                    pass  # incomplete: refused
                else:
                    assert any(torch.equal(left, v) for v in expect.values()), f"{d.name} opened with wrong rows"
                shutil.rmtree(d)
    print(f"\nRELIABILITY crash cli-build: 2 trials, store versions after kill {outcomes}")
