"""Corruption: truncated files and flipped bytes in rows, checksums, LMDB values, the manifest and
remap arrays are detected (open or read raises a clear error naming table and block; ``verify``
reports them), and a wrong row is never returned.

Every trial corrupts a fresh copy of a small store at a random (seeded) place and then reads
*every* row, one checksum block at a time, against a dense reference: each read either raises
``StoreCorruptError`` / ``StoreNotFoundError`` or returns exactly the reference rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

import engram_store
from engram_store.disk.lmdb_zstd import block_key
from engram_store.errors import EngramStoreError, StoreCorruptError
from engram_pipeline.verify import verify_store

pytestmark = pytest.mark.reliability

ROWS, DIM = 2000, 16  # float32: 64-byte rows, 64 rows per 4 KiB block, 32 blocks per table


def make_base(tmp: Path, backend: str) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tables = {"t0": torch.randn(ROWS, DIM, generator=g), "t1": torch.randn(ROWS, DIM, generator=g)}
    order = {n: torch.randperm(ROWS, generator=g) for n in tables}
    return engram_store.write(tmp / f"base-{backend}", tables, order=order, backend=backend, fingerprint="fp"), tables


def read_every_block(path: Path, ref: dict, rng) -> tuple[set, int]:
    """Open with random small budgets and read every block's rows; returns ({(table, block) that raised}, rows ok).

    A returned row that differs from the reference fails the test at once.
    """
    bad, ok = set(), 0
    with engram_store.open(path, device="cpu", hbm_bytes=int(rng.integers(0, 3)) * 64 * 64,
                           dram_bytes=int(rng.integers(0, 6)) * 64 * 64) as s:
        for name, T in ref.items():
            ranks = torch.from_numpy(s.remap(name))
            br = s.block_rows(name)
            for b in range(-(-ROWS // br)):
                ids = torch.nonzero((ranks // br) == b).reshape(-1)
                try:
                    got = s.lookup(name, ids)
                except StoreCorruptError as e:
                    assert f"table {name!r} block {b}" in str(e), f"error does not name table and block: {e}"
                    bad.add((name, b))
                    continue
                assert torch.equal(got, T[ids]), f"WRONG ROWS returned: table {name} block {b}"
                ok += ids.numel()
    return bad, ok


def flip(path: Path, pos: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ mask]))


class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}  # kind -> [injected, detected, harmless]

    def add(self, kind: str, detected: bool, harmless: bool = False) -> None:
        c = self.rows.setdefault(kind, [0, 0, 0])
        c[0] += 1
        c[1] += bool(detected)
        c[2] += bool(harmless)


def corrupt_rows_trial(base, ref, tmp, rng, tally, backend, kind) -> None:
    path = tmp / "victim"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    name = str(rng.choice(list(ref)))
    entry = json.loads((path / "manifest.json").read_text())["tables"][name]
    bb = entry["block_rows"] * entry["row_bytes"]
    if kind == "row-bytes":  # mmap row file
        pos = int(rng.integers(0, ROWS * entry["row_bytes"]))
        flip(path / f"{name}.rows", pos, 1 << int(rng.integers(0, 8)))
        block = pos // bb
    elif kind == "crc-file":  # mmap checksum file
        pos = int(rng.integers(0, 4 * -(-ROWS // entry["block_rows"])))
        flip(path / f"{name}.crc32", pos, 1 << int(rng.integers(0, 8)))
        block = pos // 4
    else:  # "lmdb-value": a byte of one block's value, in data.mdb itself
        block = int(rng.integers(0, -(-ROWS // entry["block_rows"])))
        env = lmdb.open(str(path / "rows.lmdb"), readonly=True, lock=False)
        with env.begin() as txn:
            value = bytes(txn.get(block_key(name, block)))
        env.close()
        data = (path / "rows.lmdb" / "data.mdb").read_bytes()
        # a small (short last block) value sits in a leaf page, which copy-on-write may have left a
        # stale copy of in a free page: corrupt every copy at the same offset, so the live one is hit
        where, at = [], data.find(value)
        while at >= 0:
            where.append(at)
            at = data.find(value, at + 1)
        assert where
        off, mask = int(rng.integers(0, len(value))), 1 << int(rng.integers(0, 8))
        for at in where:
            flip(path / "rows.lmdb" / "data.mdb", at + off, mask)
    try:
        bad, _ = read_every_block(path, ref, rng)
    except StoreCorruptError as e:  # the HBM tier held the block: the open itself refused
        assert f"table {name!r} block {block}" in str(e), str(e)
        bad = {(name, block)}
    report = verify_store(path, progress=False)
    assert bad <= {(name, block)}, f"blocks reported bad that were not corrupted: {bad}"
    assert report.bad_blocks() == [(name, block)], f"verify: {report.bad_blocks()} {report.errors}"
    tally.add(kind, detected=bad == {(name, block)})
    assert bad == {(name, block)}, f"{kind}: corruption of {name} block {block} went unnoticed"


def corrupt_meta_trial(base, ref, tmp, rng, tally, kind) -> None:
    """A flipped bit in manifest.json or a remap array: open refuses, or (a whitespace flip that
    changes nothing the store means) opens and answers exactly."""
    path = tmp / "victim"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    target = path / ("manifest.json" if kind == "manifest" else f"{rng.choice(list(ref))}.remap.npy")
    before = target.read_bytes()
    pos = int(rng.integers(0, len(before)))
    flip(target, pos, 1 << int(rng.integers(0, 8)))
    try:
        engram_store.open(path, device="cpu").close()
    except EngramStoreError as e:
        assert "rebuild" in str(e) or "manifest" in str(e), str(e)
        if kind == "remap":
            assert f"table {target.name.split('.')[0]!r}" in str(e) or target.name in str(e), str(e)
        assert not verify_store(path, progress=False).ok
        tally.add(kind, detected=True)
        return
    # it opened: only acceptable if the flip changed no meaning (JSON whitespace)
    same = kind == "manifest" and json.loads(before) == json.loads(target.read_bytes())
    tally.add(kind, detected=False, harmless=same)
    assert same, f"{kind}: flip at byte {pos} of {target.name} changed the store's meaning but opened"
    bad, ok = read_every_block(path, ref, rng)
    assert not bad and ok == ROWS * len(ref)


def truncation_trial(base, ref, tmp, rng, tally) -> None:
    """Row file shorter than the manifest says: at rest (open refuses) and after open (read names the block)."""
    path = tmp / "victim"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    name = str(rng.choice(list(ref)))
    size = ROWS * DIM * 4
    cut = int(rng.integers(0, size))
    with open(path / f"{name}.rows", "r+b") as f:
        f.truncate(cut)
    with pytest.raises(StoreCorruptError, match=f"{name}.rows.*truncated"):
        engram_store.open(path, device="cpu")
    assert not verify_store(path, progress=False).ok
    tally.add("truncated row file (at rest)", detected=True)
    shutil.rmtree(path)
    shutil.copytree(base, path)
    with engram_store.open(path, device="cpu") as s:
        with open(path / f"{name}.rows", "r+b") as f:
            f.truncate(cut)
        ranks = torch.from_numpy(s.remap(name))
        lost = int(cut // (64 * 64))  # first block that is no longer whole
        ids = torch.nonzero(ranks // 64 == lost).reshape(-1)
        with pytest.raises(StoreCorruptError, match=f"table '{name}' block {lost}: short read"):
            s.lookup(name, ids)
        keep = torch.nonzero(ranks // 64 < lost).reshape(-1)
        assert torch.equal(s.lookup(name, keep), ref[name][keep])
    tally.add("truncated row file (after open)", detected=True)


def run_corruptions(tmp: Path, trials: int, seed: int) -> Tally:
    rng = np.random.default_rng(seed)
    tally = Tally()
    for backend in ("mmap", "lmdb"):
        base, ref = make_base(tmp, backend)
        kinds = ["row-bytes", "crc-file"] if backend == "mmap" else ["lmdb-value"]
        for _ in range(trials):
            for kind in kinds:
                corrupt_rows_trial(base, ref, tmp, rng, tally, backend, kind)
            corrupt_meta_trial(base, ref, tmp, rng, tally, "manifest")
            corrupt_meta_trial(base, ref, tmp, rng, tally, "remap")
        if backend == "mmap":
            for _ in range(max(1, trials // 4)):
                truncation_trial(base, ref, tmp, rng, tally)
    return tally


def print_tally(tally: Tally, label: str) -> None:
    for kind, (n, d, h) in sorted(tally.rows.items()):
        print(f"RELIABILITY corruption {label} {kind}: injected {n}, detected {d}, harmless (no change) {h}")


def test_corruptions_are_detected_and_never_served(tmp_path):
    tally = run_corruptions(tmp_path, trials=20, seed=3)
    print()
    print_tally(tally, "short")


@pytest.mark.reliability_long
def test_corruptions_many(tmp_path):
    tally = run_corruptions(tmp_path, trials=150, seed=30)
    print()
    print_tally(tally, "long")


def test_every_manifest_byte(tmp_path):
    """Exhaustive: one bit flipped at every byte of the manifest; each is refused or changes nothing."""
    base, ref = make_base(tmp_path, "mmap")
    raw = (base / "manifest.json").read_bytes()
    want = json.loads(raw)
    path = tmp_path / "victim"
    shutil.copytree(base, path)
    refused = harmless = 0
    for pos in range(len(raw)):
        (path / "manifest.json").write_bytes(raw[:pos] + bytes([raw[pos] ^ 0x04]) + raw[pos + 1:])
        try:
            engram_store.open(path, device="cpu").close()
        except EngramStoreError:
            refused += 1
            continue
        assert json.loads((path / "manifest.json").read_bytes()) == want, f"flip at byte {pos} accepted"
        harmless += 1
    print(f"\nRELIABILITY corruption manifest-exhaustive: {len(raw)} flips, refused {refused}, "
          f"harmless (whitespace) {harmless}")
    assert refused + harmless == len(raw) and refused > 0.8 * len(raw)


def test_verify_reads_off_is_the_only_way_to_a_wrong_row(tmp_path):
    """The opt-out is real: with verify_reads=False a flipped byte is served (so the default matters)."""
    base, ref = make_base(tmp_path, "mmap")
    flip(base / "t0.rows", 10, 0x40)
    rank0_row = int(np.flatnonzero(np.load(base / "t0.remap.npy") == 0)[0])
    with engram_store.open(base, device="cpu", verify_reads=False) as s:
        assert not torch.equal(s.lookup("t0", torch.tensor([rank0_row])), ref["t0"][[rank0_row]])
    with engram_store.open(base, device="cpu") as s:
        with pytest.raises(StoreCorruptError, match="table 't0' block 0"):
            s.lookup("t0", torch.tensor([rank0_row]))
