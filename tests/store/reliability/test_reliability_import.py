"""Reliability of checkpoint imports: kill -9, a shard truncated or corrupted mid-import, a full disk.

The store is written by ``engram_pipeline.import_hf.import_hf_checkpoint`` (and ``engram-store build
--checkpoint``) from generated V4.1-format checkpoints; the truth for every row is
``engram_pipeline.v41_checkpoint.expected_rows`` (recomputed, no file read) and, for the rank
order, ``Counts.order`` (``remap[order[rank]] == rank``). Two checkpoints with the same hash config
(seeds 1 and 2: same tables, other bytes) alternate between versions and every version has its
own counts, so a store mixing two imports (rows of one, remap of another) cannot pass.

* kill -9 at random delays of imports in rank order with small buckets (the kill lands in the
  scatter pass, the gather pass or the commit; the child reports which it reached) over an
  existing store: after each kill the path holds the whole old or the whole new store; every
  leftover (``.<name>.partial-*``, ``.<name>.<table>.import-*``) is listed by ``verify`` and never
  opens as a wrong store; the next import removes them all.
* a shard truncated while the import reads it (a hook after the first chunk, and a racing thread):
  a clear ``StoreCorruptError`` before commit, the old store whole (or nothing) at the path, no
  sibling left; a flipped byte in a shard is copied faithfully, and a flipped byte in the imported
  store's row file is found by ``verify`` and refused by reads.
* a full disk (``RLIMIT_FSIZE``) in the scatter files, in the store's files, in-order or permuted:
  ``StoreWriteError``, nothing half-written, the old store whole.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_store
from engram_pipeline.counts import Counts
from engram_pipeline.hf_checkpoint import HFCheckpoint, open_hf_checkpoint
from engram_pipeline.import_hf import import_hf_checkpoint
from engram_pipeline.v41_checkpoint import expected_rows, write_v41_checkpoint
from engram_pipeline.verify import verify_store
from engram_store.errors import EngramStoreError, StoreCorruptError
from engram_store.format import PartialDir, read_manifest
from engram_store.writer import StoreWriter
from test_reliability_badinput import _forked, _limit_file_size
from test_reliability_crash import fork_and_kill

pytestmark = pytest.mark.reliability

VOCAB = 500  # engram_vocab_size: ~13-15 K rows per table, 2 tables, 7.4 MB of packed rows
SMALL_BUCKET = 264 * 1024  # ~13 buckets per table: the scatter and gather passes both run
CHUNK = 2048
PHASES = {1: "scatter", 2: "gather", 3: "commit"}
_PHASE_BASE = 1 << 31  # reported phase events, beside the version numbers


class World:
    """Two checkpoints (same tables, other bytes), the truth of their rows, and counts per version."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ckpts = []
        for seed in (1, 2):
            p = root / f"ckpt{seed}"
            write_v41_checkpoint(p, engram_vocab_size=VOCAB, layer_ids=(1, 14), seed=seed, progress=False)
            self.ckpts.append(p)
        with open_hf_checkpoint(self.ckpts[0]) as ck:  # warms the tokenizer cache forked children inherit
            self.fingerprint = ck.fingerprint
            self.rows = {n: t.rows for n, t in ck.tables.items()}
        self.truth = [{n: expected_rows(p, n, np.arange(r)) for n, r in self.rows.items()} for p in self.ckpts]
        self._counts: dict[int, Counts] = {}

    def ckpt(self, k: int) -> Path:
        return self.ckpts[k % 2]

    def counts(self, k: int) -> Counts:
        if k not in self._counts:
            rng = np.random.default_rng(10_000 + k)
            self._counts[k] = Counts(self.fingerprint, {n: rng.integers(0, 50, r) for n, r in self.rows.items()})
        return self._counts[k]

    def holds(self, path: Path, k: int) -> bool:
        """True when the store at ``path`` is version ``k`` exactly: every packed row and the rank order."""
        with engram_store.open(path, device="cpu") as s:
            for n, r in self.rows.items():
                if s.tables[n].rows != r or s.tables[n].row_format != "fp8_e4m3_ue8m0":
                    return False
                if not torch.equal(s.lookup(n, torch.arange(r), dequantize=False), self.truth[k % 2][n]):
                    return False
                if not np.array_equal(s.remap(n)[self.counts(k).order(n)], np.arange(r)):
                    return False
        return True

    def version(self, path: Path, candidates) -> int | None:
        for k in candidates:
            if self.holds(path, k):
                return k
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("v41-import"))


def do_import(world: World, path: Path, k: int, backend: str = "mmap", bucket_bytes: int = SMALL_BUCKET,
              ordered: bool = True) -> None:
    import_hf_checkpoint(world.ckpt(k), path, counts=world.counts(k) if ordered else None, backend=backend,
                         overwrite=True, bucket_bytes=bucket_bytes, chunk_rows=CHUNK, progress=False)


def siblings(path: Path) -> list[str]:
    """Every entry beside ``path`` (the tests give each store a directory of its own): a leftover, named or not."""
    return sorted(d.name for d in path.parent.iterdir() if d.name != path.name and not d.name.startswith("ckpt"))


# -- kill -9 -------------------------------------------------------------------------------

def _report_phases(report) -> None:
    """In the child only: report when the import reaches each phase (the last one before the kill is where it landed)."""
    state = {"phase": 0}

    def mark(p):
        if state["phase"] != p:
            state["phase"] = p
            report(_PHASE_BASE + p)

    real_iter, real_write, real_commit = HFCheckpoint.iter_rows, StoreWriter.write_rows, PartialDir.commit

    def iter_rows(self, *a, **kw):
        for chunk in real_iter(self, *a, **kw):
            mark(1)
            yield chunk

    def write_rows(self, *a, **kw):
        mark(2)
        return real_write(self, *a, **kw)

    def commit(self):
        mark(3)
        return real_commit(self)

    HFCheckpoint.iter_rows, StoreWriter.write_rows, PartialDir.commit = iter_rows, write_rows, commit


def check_leftovers(world: World, path: Path, candidates) -> dict:
    """verify lists exactly the siblings present; none opens as a store with wrong rows. Returns counts by kind."""
    report = verify_store(path, progress=False)
    assert report.ok, (report.errors, report.bad_blocks())
    listed = sorted(Path(x["path"]).name for x in report.leftovers)
    assert listed == siblings(path), (listed, siblings(path))
    assert not any(x["in_use"] for x in report.leftovers), "a dead writer's directory reported in use"
    kinds: dict[str, int] = {}
    for x in report.leftovers:
        kinds[x["kind"]] = kinds.get(x["kind"], 0) + 1
        d = Path(x["path"])
        try:
            read_manifest(d)
            assert x["kind"] != "scratch", f"{d.name}: a scratch directory has a store manifest"
            k = world.version(d, candidates)
        except EngramStoreError:
            continue  # incomplete (never committed, or an old copy half removed): refused
        assert k is not None, f"{d.name} opens as a store with wrong rows"
    return kinds


def run_import_kills(world: World, tmp: Path, backend: str, trials: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    path = tmp / f"imp-{backend}" / "s"
    do_import(world, path, 0, backend)
    t0 = time.perf_counter()
    do_import(world, path, 0, backend)
    # A forked child on a loaded machine runs slower than this warm import: kill over several of them.
    one = max(time.perf_counter() - t0, 0.2)
    current, survived = 0, 0
    landed = {p: 0 for p in ("before", *PHASES.values())}
    leftovers: dict[str, int] = {}
    for trial in range(trials):
        start = current

        def child(report, start=start):
            _report_phases(report)
            for k in range(start + 1, start + 1000):
                do_import(world, path, k, backend)
                report(k)

        events = fork_and_kill(child, float(rng.uniform(0.0, 5.0 * one)))
        versions = [e for e in events if e < _PHASE_BASE]
        phases = [e - _PHASE_BASE for e in events if e >= _PHASE_BASE]
        last = versions[-1] if versions else start
        k = world.version(path, (last, last + 1))
        assert k is not None, f"trial {trial}: the path holds neither version {last} nor {last + 1} whole"
        current = k
        landed[PHASES[phases[-1]] if phases else "before"] += 1
        # A leftover may be any earlier version: a whole old copy outlives the trial whose child died before sweeping.
        for kind, n in check_leftovers(world, path, range(current + 1, -1, -1)).items():
            leftovers[kind] = leftovers.get(kind, 0) + n
        survived += 1
    # The next import removes every dead writer's leftovers (partial and scratch directories).
    do_import(world, path, current + 1, backend)
    assert world.holds(path, current + 1)
    assert siblings(path) == [], f"leftovers not removed by the next import: {siblings(path)}"
    return {"backend": backend, "trials": trials, "survived": survived, "versions_committed": current,
            "kills_in": landed, "leftovers_listed_then_swept": leftovers, "one_import_s": round(one, 3)}


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_kill9_during_import_leaves_old_or_new_store(world, tmp_path, backend):
    r = run_import_kills(world, tmp_path, backend, trials=6, seed=17)
    print(f"\nRELIABILITY import kill9 {backend}: {r}")
    assert r["survived"] == r["trials"]
    assert r["trials"] - r["kills_in"]["before"] > 0, "no kill landed inside an import"


@pytest.mark.reliability_long
@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_kill9_during_import_many_trials(world, tmp_path, backend):
    r = run_import_kills(world, tmp_path, backend, trials=60, seed=171)
    print(f"\nRELIABILITY import kill9 long {backend}: {r}")
    assert r["survived"] == r["trials"]
    # Every phase is hit on the flat-file backend; LMDB's import is mostly its gather (the writes).
    assert sum(r["kills_in"][p] > 0 for p in PHASES.values()) >= (3 if backend == "mmap" else 1), r["kills_in"]


def _cli_build(world: World, out: Path, k: int, counts_dir: Path) -> list[str]:
    counts = counts_dir / f"counts-{k}.npz"
    if not counts.exists():
        world.counts(k).save(counts)
    return [sys.executable, "-m", "engram_store_cli.cli", "build", "--checkpoint", str(world.ckpt(k)), "--counts",
            str(counts), "-o", str(out), "--overwrite", "--no-progress"]


def run_cli_kills(world: World, tmp: Path, trials: int, seed: int) -> dict:
    """``engram-store build --checkpoint --counts --overwrite`` (real CLI processes) killed at random points of
    the import: each kill waits for the build's partial directory to appear (start-up, mostly imports and the
    tokenizer's compression, takes seconds on this machine), then a random delay."""
    import signal

    repo = Path(__file__).resolve().parents[3]
    out = tmp / "stores" / "cli-store"
    do_import(world, out, 0)
    rng = np.random.default_rng(seed)
    current, outcomes = 0, []
    for trial in range(trials):
        k_new = current + 1
        proc = subprocess.Popen(_cli_build(world, out, k_new, tmp), cwd=repo, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.perf_counter() + 120
        while not any(".partial-" in n for n in siblings(out)) and proc.poll() is None:
            assert time.perf_counter() < deadline, "the CLI build never started writing"
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        k = world.version(out, (current, k_new))
        assert k is not None, f"trial {trial}: after a killed build the store is neither version {current} nor {k_new}"
        outcomes.append("new" if k == k_new else "old")
        check_leftovers(world, out, range(k_new, -1, -1))
        current = k
    do_import(world, out, current + 1)  # the next write (the API's) removes the CLI's leftovers
    assert world.holds(out, current + 1) and siblings(out) == []
    return {"trials": trials, "survived": trials, "store_after_kill": outcomes}


def test_kill9_during_cli_build_from_checkpoint(world, tmp_path):
    r = run_cli_kills(world, tmp_path, trials=1, seed=23)
    print(f"\nRELIABILITY import kill9 cli-build: {r}")


@pytest.mark.reliability_long
def test_kill9_during_cli_build_many_trials(world, tmp_path):
    r = run_cli_kills(world, tmp_path, trials=8, seed=231)
    print(f"\nRELIABILITY import kill9 cli-build long: {r}")


# -- a shard truncated or corrupted mid-import ------------------------------------------------

MODES = {  # (ordered, bucket_bytes): checkpoint order; rank order in memory; rank order through buckets
    "in-order": (False, SMALL_BUCKET),
    "rank-order-memory": (True, 1 << 30),
    "rank-order-buckets": (True, SMALL_BUCKET),
}


def _private_ckpt(world: World, tmp: Path, k: int) -> Path:
    dst = tmp / f"ckpt-copy-{k}"
    shutil.copytree(world.ckpt(k), dst)
    return dst


def _weight_shard(ckpt: Path, table: str) -> Path:
    wmap = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return ckpt / wmap[f"layers.{table.removeprefix('layer')}.engram.embed.weight"]


def _hook_after_first_chunk(monkeypatch, action) -> None:
    """Run ``action(table)`` once, after the import has read the first chunk of a table (a reader hook)."""
    real = HFCheckpoint.iter_rows
    done = []

    def iter_rows(self, name, *a, **kw):
        for i, chunk in enumerate(real(self, name, *a, **kw)):
            yield chunk
            if i == 0 and not done:
                done.append(name)
                action(self, name)

    monkeypatch.setattr(HFCheckpoint, "iter_rows", iter_rows)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("old_store", [True, False])
def test_shard_truncated_mid_import_raises_before_commit(world, tmp_path, monkeypatch, mode, old_store):
    ordered, bucket = MODES[mode]
    path = tmp_path / "s"
    if old_store:
        do_import(world, path, 0)
    ck = _private_ckpt(world, tmp_path, 1)

    def truncate(ckpt, name):
        shard = _weight_shard(ck, name)
        os.truncate(shard, shard.stat().st_size // 2)

    _hook_after_first_chunk(monkeypatch, truncate)
    with pytest.raises(StoreCorruptError, match=r"truncated after it was opened") as e:
        import_hf_checkpoint(ck, path, counts=world.counts(1) if ordered else None, overwrite=True,
                             bucket_bytes=bucket, chunk_rows=CHUNK, progress=False)
    assert "safetensors" in str(e.value) and "download it again" in str(e.value)
    monkeypatch.undo()
    assert siblings(path) == [], f"a failed import left {siblings(path)}"
    if old_store:
        assert world.holds(path, 0), "the old store is not whole after a failed import"
    else:
        assert not path.exists(), "a failed import left something at the path"


def test_shard_truncated_by_a_racing_thread(world, tmp_path):
    """A thread truncates the shard at random moments of real imports: an error before commit and the old store,
    or (truncated after the last read) the whole new store; never a partial one."""
    path = tmp_path / "s"
    do_import(world, path, 0)
    rng = np.random.default_rng(29)
    t0 = time.perf_counter()
    do_import(world, path, 2)  # version 2: the same checkpoint as the copies below
    one = time.perf_counter() - t0
    current, outcomes = 2, []
    for trial in range(4):
        ck = _private_ckpt(world, tmp_path, 1)
        delay = float(rng.uniform(0.0, 1.2 * one))
        k = current + 1 if current % 2 == 0 else current + 2  # odd: checkpoint seed 2, the copy's
        shard = _weight_shard(ck, "layer1" if trial % 2 else "layer14")
        t = threading.Timer(delay, lambda s=shard: os.truncate(s, s.stat().st_size // 3))
        t.start()
        try:
            import_hf_checkpoint(ck, path, counts=world.counts(k), overwrite=True, bucket_bytes=SMALL_BUCKET,
                                 chunk_rows=CHUNK, progress=False)
        except StoreCorruptError as e:  # opened before the cut (a read of it fails) or after (open refuses)
            assert "truncated" in str(e), e
            outcomes.append("refused")
        else:
            outcomes.append("whole")
            current = k
        t.join()
        assert world.holds(path, current), f"trial {trial} ({outcomes[-1]}): the store is not version {current}"
        assert siblings(path) == [], siblings(path)
        shutil.rmtree(ck)
    print(f"\nRELIABILITY import truncate-race: {len(outcomes)} truncations, outcomes {outcomes}")
    assert "refused" in outcomes


def test_flipped_byte_in_shard_is_copied_and_store_flips_are_detected(world, tmp_path, monkeypatch):
    """A flipped byte in a row of a shard (mid-import) is the checkpoint's content: the store holds it, exactly.
    Flipped bytes in the imported store's row file are then found by verify (that block only) and refused by reads."""
    ck = _private_ckpt(world, tmp_path, 1)
    name, row, col = "layer14", world.rows["layer14"] - 3, 17  # a row the import has not read yet

    def flip(ckpt, table):
        ref = ckpt.tables[name].weight
        with open(ref.shard, "r+b") as f:
            f.seek(ref.start + row * 256 + col)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))

    _hook_after_first_chunk(monkeypatch, flip)
    path = tmp_path / "s"
    import_hf_checkpoint(ck, path, counts=world.counts(1), overwrite=True, bucket_bytes=SMALL_BUCKET,
                         chunk_rows=CHUNK, progress=False)
    monkeypatch.undo()
    want = {n: t.clone() for n, t in world.truth[1].items()}
    want[name][row, col] ^= 0x40
    with engram_store.open(path, device="cpu") as s:
        for n, r in world.rows.items():
            assert torch.equal(s.lookup(n, torch.arange(r), dequantize=False), want[n]), n
    assert verify_store(path, progress=False).ok

    m = read_manifest(path)["tables"]["layer1"]
    rng = np.random.default_rng(31)
    injected = detected = 0
    for _ in range(4):
        copy = tmp_path / f"flip-{injected}"
        shutil.copytree(path, copy)
        block = int(rng.integers(0, -(-m["rows"] // m["block_rows"])))
        n_rows = min(m["block_rows"], m["rows"] - block * m["block_rows"])
        offset = block * m["block_stride"] + int(rng.integers(0, n_rows * m["row_bytes"]))  # inside a row's bytes
        with open(copy / m["rows_file"], "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x01]))
        injected += 1
        report = verify_store(copy, progress=False)
        assert report.bad_blocks() == [("layer1", block)], report.bad_blocks()
        with engram_store.open(copy, device="cpu") as s:
            rank = block * m["block_rows"]
            row_id = int(np.flatnonzero(s.remap("layer1") == rank)[0])
            with pytest.raises(StoreCorruptError, match="layer1"):
                s.lookup("layer1", torch.tensor([row_id]), dequantize=False)
        detected += 1
        shutil.rmtree(copy)
    print(f"\nRELIABILITY import corruption: shard flip copied faithfully 1/1; store flips detected "
          f"{detected}/{injected}")


# -- a full disk ------------------------------------------------------------------------------

FULL_DISK = {  # where the limit bites: (ordered, bucket_bytes, limit bytes)
    "scatter-bucket-files": (True, 2 << 20, 1 << 20),  # 2 MiB buckets: bucket files pass 1 MiB in the scatter
    "store-files-gather": (True, SMALL_BUCKET, 2 << 20),  # buckets ~270 KB pass; the 3.5 MB row file does not
    "store-files-in-order": (False, SMALL_BUCKET, 2 << 20),
}


@pytest.fixture(scope="module")
def old_stores(world, tmp_path_factory) -> dict[str, Path]:
    """Version 0 per backend, imported once; each test overwrites a copy."""
    root = tmp_path_factory.mktemp("old-stores")
    out = {}
    for backend in ("mmap", "lmdb"):
        out[backend] = root / backend / "s"
        do_import(world, out[backend], 0, backend)
    return out


@pytest.mark.parametrize("backend, where", [("mmap", w) for w in FULL_DISK] + [("lmdb", "scatter-bucket-files"),
                                                                               ("lmdb", "store-files-gather")])
def test_full_disk_mid_import(world, old_stores, tmp_path, backend, where):
    ordered, bucket, limit = FULL_DISK[where]
    path = tmp_path / "s"
    shutil.copytree(old_stores[backend], path)

    def run():
        _limit_file_size(limit)
        import_hf_checkpoint(world.ckpt(1), path, counts=world.counts(1) if ordered else None, backend=backend,
                             overwrite=True, bucket_bytes=bucket, chunk_rows=CHUNK, progress=False)

    code, msg = _forked(run)
    assert code == 1 and msg.startswith("StoreWriteError: ") and "disk full" in msg, msg
    assert "nothing was committed" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"], "a failed import left a partial or scratch directory"
    assert world.holds(path, 0), "the old store is not whole after a full disk"
