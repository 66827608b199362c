"""Bad input across the Python API and the CLI: a table of cases, the error each gets, and the store
still answering exactly afterwards. ``CASES`` is printed as the README's table (-s)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_store
from engram_store import budget, format as fmt
from engram_store.disk import blocks
from engram_store.disk.lmdb_zstd import LmdbDisk
from engram_store.disk.flatfile import FlatFileDisk
from engram_store.errors import (
    BudgetError, EngramStoreError, FingerprintMismatchError, InvalidRowIdsError, InvalidValuesError,
    StoreClosedError, StoreExistsError, StoreNotFoundError, StoreWriteError, UnknownTableError,
)

pytestmark = pytest.mark.reliability

ROWS, DIM = 1000, 4
T = torch.arange(ROWS * DIM, dtype=torch.float32).reshape(ROWS, DIM)


@pytest.fixture(params=["mmap", "lmdb"])
def store(request, tmp_path):
    path = engram_store.write(tmp_path / "s", {"t": T}, backend=request.param, fingerprint="fp1",
                              order={"t": torch.from_numpy(np.random.default_rng(0).permutation(ROWS))})
    with engram_store.open(path, device="cpu", hbm_bytes=50 * 16, dram_bytes=100 * 16) as s:
        yield s


BAD_IDS = {
    "negative id": (torch.tensor([3, -1]), InvalidRowIdsError),
    "id = rows (too large)": (torch.tensor([ROWS]), InvalidRowIdsError),
    "id 2**40 in a 2-D batch": (torch.tensor([[1, 2**40]]), InvalidRowIdsError),
    "float ids": (torch.tensor([1.0]), InvalidRowIdsError),
    "numpy float ids": (np.array([1.5]), InvalidRowIdsError),
    "bool ids": (torch.tensor([True]), InvalidRowIdsError),
    "uint64 above int64": (np.array([2**63], dtype=np.uint64), InvalidRowIdsError),
    "python ints beyond int64": ([2**70], InvalidRowIdsError),
    "strings": (["a"], InvalidRowIdsError),
    "None": (None, InvalidRowIdsError),
}


@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_ids(store, case):
    ids, err = BAD_IDS[case]
    with pytest.raises(err) as e:
        store.prefetch("t", ids)
    assert "row ids of table 't'" in str(e.value)
    with pytest.raises(err):
        store.update("t", ids, torch.zeros(*np.shape(np.asarray(ids, dtype=object)), DIM))
    assert torch.equal(store.lookup("t", torch.arange(ROWS)), T)  # nothing half-done


GOOD_ODD_IDS = {
    "empty 1-D": torch.empty(0, dtype=torch.long),
    "empty 2-D": torch.empty(0, 3, dtype=torch.long),
    "empty list": [],
    "non-contiguous (strided)": torch.arange(ROWS).reshape(100, 10)[:, ::3],
    "non-contiguous (transposed)": torch.arange(60).reshape(6, 10).t(),
    "uint8": torch.arange(200, dtype=torch.uint8),
    "int16": torch.arange(300, dtype=torch.int16),
    "int32 numpy": np.arange(500, dtype=np.int32),
    "python list with repeats": [5, 5, 999, 0, 5],
    "3-D with repeats": torch.randint(0, ROWS, (4, 5, 6)),
    "0-d scalar": torch.tensor(7),
}


@pytest.mark.parametrize("case", list(GOOD_ODD_IDS))
def test_odd_but_valid_ids_are_served_exactly(store, case):
    ids = GOOD_ODD_IDS[case]
    want = T[torch.as_tensor(np.asarray(ids), dtype=torch.long)]
    got = store.lookup("t", ids)
    assert got.shape == want.shape and torch.equal(got, want)


def test_batch_larger_than_dram_budget_is_served_in_chunks(tmp_path, monkeypatch):
    """2M ids (32 MiB of rows) through a 1 KiB DRAM tier: exact, and no disk read holds more than
    READ_CHUNK_BYTES of blocks at once (observed, not mocked: the real read runs)."""
    T2 = torch.randn(100_000, 4)
    for backend, cls in (("mmap", FlatFileDisk), ("lmdb", LmdbDisk)):
        path = engram_store.write(tmp_path / backend, {"t": T2}, backend=backend)
        monkeypatch.setattr(blocks, "READ_CHUNK_BYTES", 64 << 10)
        biggest = []
        real = cls._parallel
        monkeypatch.setattr(cls, "_parallel", lambda self, t, blocks, buf: biggest.append(buf.nbytes) or real(self, t, blocks, buf))
        ids = torch.randint(0, 100_000, (2_000_000,))
        with engram_store.open(path, device="cpu", dram_bytes=1024) as s:
            assert torch.equal(s.lookup("t", ids), T2[ids])
        assert max(biggest) <= 64 << 10 and len(biggest) > 5  # 391 blocks of 4 KiB = 1.6 MiB, in chunks
        monkeypatch.undo()


def test_unknown_table_closed_store_and_fingerprint(store, tmp_path):
    with pytest.raises(UnknownTableError, match="unknown table 'nope'.*holds \\['t'\\]"):
        store.lookup("nope", [1])
    with pytest.raises(UnknownTableError):
        store.lookup(3, [1])
    with pytest.raises(FingerprintMismatchError, match="rebuild the store from this checkpoint"):
        engram_store.open(store.path, device="cpu", fingerprint="fp2")
    with pytest.raises(EngramStoreError, match="backend"):
        engram_store.open(store.path, device="cpu", backend="mmap" if store.backend == "lmdb" else "lmdb")
    with pytest.raises(StoreNotFoundError):
        engram_store.open(tmp_path / "missing", device="cpu")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreNotFoundError):
        engram_store.open(tmp_path / "afile", device="cpu")
    if store.backend == "lmdb":  # LMDB allows one handle per environment and process
        with pytest.raises(EngramStoreError, match="open once per process"):
            engram_store.open(store.path, device="cpu")
    store.close()
    with pytest.raises(StoreClosedError):
        store.lookup("t", [1])
    other = engram_store.open(store.path, device="cpu")  # reopens after close
    other.close()


@pytest.mark.parametrize("values, err", [
    (torch.zeros(2, DIM, dtype=torch.float16), InvalidValuesError),
    (torch.zeros(2, DIM + 1), InvalidValuesError),
    (torch.zeros(3, DIM), InvalidValuesError),
    (np.zeros((2, DIM), np.float32), InvalidValuesError),
    (torch.full((2, DIM), float("nan")), None),  # NaN is a value: stored and returned as is
    (torch.zeros(DIM, 2).t(), None),  # non-contiguous values: fine
])
def test_update_values(store, values, err):
    ids = torch.tensor([1, 2])
    if err is not None:
        with pytest.raises(err):
            store.update("t", ids, values)
        assert torch.equal(store.lookup("t", ids), T[ids])
    else:
        store.update("t", ids, values)
        assert torch.equal(store.lookup("t", ids).isnan(), values.isnan())
    store.update("t", torch.tensor([9, 9]), torch.stack([torch.ones(DIM), 2 * torch.ones(DIM)]))
    assert torch.equal(store.lookup("t", [9]), 2 * torch.ones(1, DIM))  # repeated id: last wins


@pytest.mark.parametrize("kw", [dict(dram_bytes=-1), dict(hbm_bytes=1.5e9), dict(dram_bytes=True),
                                dict(dram_bytes="1GiB")])
def test_bad_budgets(store, kw):
    with pytest.raises(BudgetError, match="non-negative int"):
        engram_store.open(store.path, device="cpu", **kw)


def test_budget_larger_than_the_machine(tmp_path):
    """Budgets are clamped to the tables; what would really be allocated beyond the machine's RAM
    (a table declared larger than RAM, as the manifest says) is BudgetError before any allocation."""
    import json

    import psutil
    path = engram_store.write(tmp_path / "s", {"t": torch.zeros(10, 2)})
    huge = 2 * psutil.virtual_memory().total
    with engram_store.open(path, device="cpu", hbm_bytes=huge, dram_bytes=huge) as s:  # clamped: fine
        assert torch.equal(s.lookup("t", [3]), torch.zeros(1, 2))
    m = json.loads((path / "manifest.json").read_text())
    m["tables"]["t"]["rows"] = huge // 8  # declared, never read
    (path / "manifest.json").write_bytes(fmt.manifest_bytes(fmt.seal_manifest(m)))
    with pytest.raises(BudgetError, match="lower dram_bytes"):
        engram_store.open(path, device="cpu", dram_bytes=huge)


def _forked(fn) -> tuple[int, str]:
    """Run ``fn()`` in a forked child; returns (exit code, what it wrote to the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            torch.set_num_threads(1)  # torch's OpenMP pool does not survive fork()
            os.write(w, str(fn()).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(w, f"{type(e).__name__}: {e}".encode())
            code = 1
        os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    out = b""
    while chunk := os.read(r, 1 << 16):
        out += chunk
    os.close(r)
    return os.WEXITSTATUS(status), out.decode()


def _limit_file_size(nbytes: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_full_disk_during_build(tmp_path, backend):
    """A file-size limit (a full disk, simulated) during build: StoreWriteError, no partial directory,
    the previous store untouched."""
    old = engram_store.write(tmp_path / "s", {"t": T}, backend=backend)
    big = torch.randn(200_000, 8)  # 6.4 MB of rows against a 1 MB limit

    def build():
        _limit_file_size(1 << 20)
        engram_store.write(tmp_path / "s", {"t": big}, backend=backend, overwrite=True)

    code, msg = _forked(build)
    assert code == 1 and msg.startswith("StoreWriteError: ") and "disk full" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no partial left behind
    with engram_store.open(old, device="cpu") as s:
        assert torch.equal(s.lookup("t", torch.arange(ROWS)), T)


def test_cli_full_disk_is_one_line(tmp_path):
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-m", "engram_store_cli.cli", "build", "--synthetic-rows", "200000", "--dim", "16",
                           "-o", str(tmp_path / "s"), "--no-progress"], cwd=repo, capture_output=True, text=True,
                          preexec_fn=lambda: _limit_file_size(1 << 20))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engram-store build: error: writing store") and "disk full" in lines[0]
    assert list(tmp_path.iterdir()) == []


CLI_CASES = [
    (["inspect", "{tmp}/nothing"], 2, "no store at"),
    (["verify", "{tmp}/nothing"], 1, "BAD store: no store at"),
    (["build", "--synthetic-rows", "-5", "-o", "{tmp}/x", "--no-progress"], 2, "synthetic tables need rows >= 1"),
    (["build", "--synthetic-rows", "10", "--dim", "0", "-o", "{tmp}/x", "--no-progress"], 2, "dim >= 1"),
    (["build", "--synthetic-rows", "10", "-o", "{tmp}/exists", "--no-progress"], 2, "exists: pass --overwrite"),
    (["build", "--synthetic-rows", "10", "--checkpoint", "c", "-o", "{tmp}/x"], 2, "drop --checkpoint"),
    (["build", "--checkpoint", "{tmp}/nockpt", "--counts", "{tmp}/nocounts", "-o", "{tmp}/x", "--dram", "12XB"], 2,
     "cannot read size '12XB'"),
    (["count", "-o", "{tmp}/c.npz"], 2, "counting needs --checkpoint"),
]


@pytest.mark.parametrize("argv, code, text", CLI_CASES)
def test_cli_bad_input(tmp_path, capsys, argv, code, text):
    from engram_store_cli.cli import main
    engram_store.write(tmp_path / "exists", {"t": T})
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out = capsys.readouterr()
    assert rc == code, out
    assert text in out.err + out.out, out
    if code == 2:
        assert len(out.err.strip().splitlines()) == 1  # one clear line, no traceback
    assert not (tmp_path / "x").exists()


def test_print_the_table(capsys):
    """The README table: every Python-API case and the error it gets (kept in sync by this test)."""
    rows = [(c, e.__name__) for c, (_, e) in BAD_IDS.items()] + [(c, "served exactly") for c in GOOD_ODD_IDS]
    with capsys.disabled():
        print("\nRELIABILITY badinput ids:")
        for case, result in rows:
            print(f"| {case} | {result} |")
    assert len(rows) == len(BAD_IDS) + len(GOOD_ODD_IDS)
