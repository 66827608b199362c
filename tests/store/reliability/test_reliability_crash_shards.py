"""Crash safety of the atomic directory commit (``engram_store.format.commit``) for sharded stores.

kill -9 during ``write_shards(..., overwrite=True)`` at random delays: after every kill the path
holds the whole old or the whole new sharded store (the versions alternate between 2 and 3
shards, so a mix of two builds cannot pass), checked row by row against dense tensors; leftover
partial directories never open as a wrong store and the next write sweeps them. Then injected
fsync / rename failures: each surfaces as ``StoreWriteError`` and leaves the old store whole.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_store
from engram_pipeline.verify import verify_store
from engram_store.errors import EngramStoreError, StoreWriteError
from engram_store.format import MANIFEST, commit
from engram_store.sharded import LAYOUT_FILE, join_shards, read_layout, shard_dir_name, write_shards
from test_reliability_crash import ROWS, overwrite_kill_trials, version_tables

pytestmark = pytest.mark.reliability


def n_shards_of(k: int) -> int:
    return 2 + k % 2


def write_version(path: Path, k: int, backend: str) -> None:
    t = version_tables(k)
    order = {"a": torch.from_numpy(np.random.default_rng(k).permutation(ROWS))}
    write_shards(path, {"a": t["a"], "b": t["b"].half()}, order, n_shards_of(k), backend=backend, overwrite=True)


class Incomplete(Exception):
    """A directory that is not a whole sharded store (entries missing or extra)."""


def read_version(path: Path) -> int | None:
    """The version ``k`` whose dense tables ``path`` holds exactly (every row of every shard), else None."""
    layout = read_layout(path)
    n = int(layout["n_shards"])
    if sorted(p.name for p in path.iterdir()) != sorted([LAYOUT_FILE, *(shard_dir_name(i, n) for i in range(n))]):
        raise Incomplete(f"{path}: {sorted(p.name for p in path.iterdir())}")
    got = join_shards(path)  # opens every shard, checks its manifest against shards.json
    k = int(got["a"][0, 0].item() // 1e5)
    want = version_tables(k)
    ok = (n == n_shards_of(k) and torch.equal(got["a"], want["a"]) and torch.equal(got["b"].float(), want["b"]))
    return k if ok else None


def check_leftovers(parent: Path, name: str, candidates: range) -> int:
    """Each ``.name.partial-*`` / ``.name.old-*`` is refused or is one whole candidate version; returns how many."""
    n = 0
    for d in parent.iterdir():
        if d.name.startswith(f".{name}."):
            n += 1
            try:
                k = read_version(d)
            except (EngramStoreError, Incomplete):
                continue  # incomplete (never committed, or an old copy half removed): refused
            assert k in candidates, f"{d.name} opened as a sharded store with wrong rows"
    return n


def run_trials(tmp: Path, backend: str, trials: int, seed: int) -> dict:
    path = tmp / f"sh-{backend}"
    leftovers, survived = 0, 0

    def check(trial, start, last):
        nonlocal leftovers, survived
        k = read_version(path)  # must be whole
        assert k in (last, last + 1), f"trial {trial}: path holds version {k}, expected {last} or {last + 1}"
        for i in range(n_shards_of(k)):  # verify (the CLI's) finds nothing wrong in any shard
            report = verify_store(path / shard_dir_name(i, n_shards_of(k)), progress=False)
            assert report.ok, (report.errors, report.bad_blocks())
        leftovers += check_leftovers(tmp, path.name, range(start, k + 2))
        survived += 1
        return k

    current = overwrite_kill_trials(lambda k: write_version(path, k, backend), trials, np.random.default_rng(seed),
                                    check)
    # The next write sweeps every dead writer's leftovers (their locks died with them).
    write_version(path, current + 1, backend)
    assert read_version(path) == current + 1
    left = sorted(d.name for d in tmp.iterdir() if d.name.startswith(f".{path.name}."))
    assert not left, f"leftovers not swept by the next write: {left}"
    return {"trials": trials, "survived": survived, "versions_committed": current, "leftover_dirs_swept": leftovers}


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_kill9_during_write_shards_overwrite(tmp_path, backend):
    r = run_trials(tmp_path, backend, trials=8, seed=13)
    print(f"\nRELIABILITY crash write_shards {backend}: {r}")
    assert r["survived"] == r["trials"] and r["versions_committed"] > 0


@pytest.mark.reliability_long
@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_kill9_during_write_shards_many_trials(tmp_path, backend):
    r = run_trials(tmp_path, backend, trials=100, seed=131)
    print(f"\nRELIABILITY crash write_shards long {backend}: {r}")


# ----------------------------------------------------------------------------- injected commit faults


def _single(path: Path, k: int) -> None:
    engram_store.write(path, version_tables(k), overwrite=True)


def _single_version(path: Path) -> int:
    with engram_store.open(path, device="cpu") as s:
        a = s.lookup("a", torch.arange(ROWS))
    k = int(a[0, 0].item() // 1e5)
    assert torch.equal(a, version_tables(k)["a"])
    return k


WRITERS = {
    "write": (_single, _single_version),
    "write_shards": (lambda p, k: write_version(p, k, "mmap"), read_version),
}


def _eio(what):
    return OSError(errno.EIO, f"injected: {what}")


def _fsync_failing(real, when):
    def fsync(p):
        if when(Path(p)):
            raise _eio(f"fsync {p}")
        return real(p)
    return fsync


FAULTS = ["fsync-file", "fsync-dir", "exchange", "fsync-parent-after-exchange", "fallback-rename"]


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("fault", FAULTS)
def test_commit_faults_raise_and_leave_old_store_whole(tmp_path, monkeypatch, writer, fault):
    write, version = WRITERS[writer]
    path = tmp_path / "s"
    write(path, 1)
    real_fsync, real_rename = commit.fsync_path, os.rename
    if fault == "fsync-file":  # the outermost commit's tree: any file of it
        monkeypatch.setattr(commit, "fsync_path", _fsync_failing(
            real_fsync, lambda p: p.name in (MANIFEST, LAYOUT_FILE) and p.parent.parent == tmp_path))
    elif fault == "fsync-dir":
        monkeypatch.setattr(commit, "fsync_path", _fsync_failing(
            real_fsync, lambda p: p.parent == tmp_path and p.name.startswith(".s.partial-")))
    elif fault == "exchange":
        monkeypatch.setattr(commit, "exchange", lambda a, b: (_ for _ in ()).throw(_eio("renameat2")))
    elif fault == "fsync-parent-after-exchange":
        swapped = []
        real_exchange = commit.exchange
        monkeypatch.setattr(commit, "exchange", lambda a, b: swapped.append(b) or real_exchange(a, b))
        monkeypatch.setattr(commit, "fsync_path", _fsync_failing(
            real_fsync, lambda p: p == tmp_path and path in swapped))
    else:  # a filesystem without RENAME_EXCHANGE, and the second rename of the fallback fails
        monkeypatch.setattr(commit, "exchange", lambda a, b: False)

        def rename(a, b):
            if Path(b) == path and Path(a).name.startswith(".s.partial-"):
                raise _eio(f"rename {a} -> {b}")
            return real_rename(a, b)
        monkeypatch.setattr(commit.os, "rename", rename)
    with pytest.raises(StoreWriteError, match="injected.*nothing was committed"):
        write(path, 2)
    monkeypatch.undo()
    assert version(path) == 1, "the old store is not whole after a failed commit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"], "a failed commit left a partial or old directory"
    write(path, 3)  # and the next write commits normally
    assert version(path) == 3


@pytest.mark.parametrize("writer", list(WRITERS))
def test_commit_without_rename_exchange_falls_back_whole(tmp_path, monkeypatch, writer):
    """Where renameat2(RENAME_EXCHANGE) is unsupported, the rename-aside fallback commits and cleans up."""
    write, version = WRITERS[writer]
    path = tmp_path / "s"
    write(path, 1)
    monkeypatch.setattr(commit, "exchange", lambda a, b: False)
    write(path, 2)
    assert version(path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_exchange_swaps_and_reports_unsupported(tmp_path):
    """The real renameat2 call: two directories swap in one step; a missing source is an error, not 'unsupported'."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    if not commit.exchange(a, b):
        pytest.skip("this filesystem has no RENAME_EXCHANGE (the fallback is tested above)")
    assert (b / "x").read_text() == "from a" and (a / "y").read_text() == "from b"
    with pytest.raises(OSError) as e:
        commit.exchange(tmp_path / "missing", a)
    assert e.value.errno == errno.ENOENT


def test_sweep_keeps_a_running_writers_partial(tmp_path):
    """A partial directory whose writer still holds its lock survives another writer's sweep; a dead one's goes."""
    target = tmp_path / "s"
    live = commit.PartialDir(target)
    dead = tmp_path / ".s.partial-deadbeef0000"
    dead.mkdir()
    (dead / "junk").write_bytes(b"x")
    removed = commit.sweep_stale(target)
    assert removed == [dead] and live.path.is_dir() and not dead.exists()
    live.abort()
    assert not live.path.exists()
