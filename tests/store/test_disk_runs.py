"""engram_store.disk.runs: merged, hinted block reads and warm copies from the map, against a plain
loop over a real file."""

from __future__ import annotations

import mmap
import os
import zlib

import numpy as np
import pytest

from engram_store.disk import runs
from engram_store.disk.runs import MAX_RUN_BLOCKS, MERGE_GAP_BLOCKS, read_runs, run_starts


def plain_run_starts(blocks, max_gap, max_len):
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None or b - blocks[i - 1] > max_gap + 1 or i - start == max_len:
            out.append(i)
            start = i
    return out


@pytest.mark.parametrize("seed", range(20))
def test_run_starts_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    blocks = np.unique(rng.integers(0, rng.integers(1, 5000), rng.integers(1, 1200)))
    for gap, length in [(MERGE_GAP_BLOCKS, MAX_RUN_BLOCKS), (0, 7), (3, 1)]:
        assert run_starts(blocks, gap, length).tolist() == plain_run_starts(blocks.tolist(), gap, length)


def write_layout(path, rows: np.ndarray, br: int, stride: int) -> None:
    """Blocks of ``br`` rows, block b at b * stride, filler bytes between blocks (written plainly)."""
    with open(path, "wb") as f:
        n_blocks = -(-rows.shape[0] // br)
        for b in range(n_blocks):
            f.seek(b * stride)
            f.write(rows[b * br:(b + 1) * br].tobytes())
            if b < n_blocks - 1:
                f.write(b"\xa5" * (stride - br * rows.shape[1]))  # filler that must never reach a block


@pytest.mark.parametrize("rb,br,stride", [(264, 15, 4096), (128, 32, 4096), (100, 40, 4000), (6000, 1, 6000)])
def test_read_runs_returns_each_blocks_bytes(tmp_path, rb, br, stride):
    rng = np.random.default_rng(rb)
    n_rows = 37 * br + br // 2 + 1  # a short last block
    rows = rng.integers(0, 256, (n_rows, rb), dtype=np.uint8)
    path = tmp_path / "t.rows"
    write_layout(path, rows, br, stride)
    n_blocks = -(-n_rows // br)

    def block_len(b):
        return min(br, n_rows - b * br) * rb

    fd = os.open(path, os.O_RDONLY)
    try:
        for trial in range(30):
            if trial == 0:
                blocks = np.arange(n_blocks)  # every block: one long run, split at MAX_RUN_BLOCKS
            else:
                blocks = np.unique(rng.integers(0, n_blocks, rng.integers(1, 2 * n_blocks)))
            buf = np.zeros((blocks.size, br * rb), np.uint8)
            # as the pool splits a batch: each thread reads blocks[lo:hi] into buf[lo:hi]
            cuts = [0, blocks.size] if trial % 2 else [0, blocks.size // 3, blocks.size]
            crcs = np.zeros(blocks.size, np.uint32)
            for lo, hi in zip(cuts, cuts[1:]):
                assert read_runs(fd, blocks, buf, lo, hi, stride, n_blocks, block_len(n_blocks - 1), crcs) == []
            for i, b in enumerate(blocks.tolist()):
                n = block_len(b)
                want = rows[b * br: b * br + n // rb].reshape(-1)
                assert np.array_equal(buf[i, :n], want), (trial, b)
                assert crcs[i] == zlib.crc32(want.tobytes()), (trial, b)
    finally:
        os.close(fd)


def test_read_runs_reports_a_short_read(tmp_path):
    rb, br, stride = 264, 15, 4096
    rows = np.arange(40 * br * rb, dtype=np.uint64).astype(np.uint8).reshape(-1, rb)
    path = tmp_path / "t.rows"
    write_layout(path, rows, br, stride)
    os.truncate(path, 20 * stride + 100)  # cut inside block 20
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = np.array([3, 19, 20, 30])
        buf = np.zeros((4, br * rb), np.uint8)
        short = read_runs(fd, blocks, buf, 0, 4, stride, 40, br * rb)
        assert short == [(20, 100, br * rb)]  # the block the cut went through, with the bytes it kept
    finally:
        os.close(fd)


def _warm_map(path):
    """The file read once (so its pages are cached) and a read-only map of it, with its address."""
    path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
    view = np.frombuffer(m, np.uint8)
    addr = view.ctypes.data
    del view
    return fd, m, addr


def _mapped_table(tmp_path, rng, rb, br, stride, n_rows):
    """Random rows laid out in blocks (a short last one), warm and mapped: rows, rows, blocks, last
    block bytes, (fd, map, address)."""
    rows = rng.integers(0, 256, (n_rows, rb), dtype=np.uint8)
    path = tmp_path / "t.rows"
    write_layout(path, rows, br, stride)
    n_blocks = -(-n_rows // br)
    return rows, n_rows, n_blocks, (n_rows - (n_blocks - 1) * br) * rb, _warm_map(path)


@pytest.mark.parametrize("rb,br,stride", [(264, 15, 4096), (128, 32, 4096), (100, 40, 4000), (6000, 1, 6000)])
def test_a_warm_batch_is_copied_from_the_map(tmp_path, monkeypatch, rb, br, stride):
    rng = np.random.default_rng(rb + 1)
    rows, n_rows, n_blocks, last_len, (fd, m, addr) = _mapped_table(tmp_path, rng, rb, br, stride, 29 * br + br // 3 + 1)

    def no_pread(*a):
        raise AssertionError("a warm batch was read with pread, not copied from the map")

    monkeypatch.setattr(runs, "_read", no_pread)
    try:
        for trial in range(20):
            blocks = np.unique(rng.integers(0, n_blocks, rng.integers(1, 2 * n_blocks)))
            buf = np.zeros((blocks.size, br * rb), np.uint8)
            crcs = np.zeros(blocks.size, np.uint32)
            cut = blocks.size // 2
            for lo, hi in ((0, cut), (cut, blocks.size)):
                assert read_runs(fd, blocks, buf, lo, hi, stride, n_blocks, last_len, crcs, addr) == []
            for i, b in enumerate(blocks.tolist()):
                want = rows[b * br: (b + 1) * br].reshape(-1)
                assert np.array_equal(buf[i, :want.size], want), (trial, b)
                assert crcs[i] == zlib.crc32(want.tobytes()), (trial, b)
    finally:
        m.close()
        os.close(fd)


def test_a_batch_with_an_evicted_page_is_read_with_pread(tmp_path, monkeypatch):
    rb, br, stride = 128, 32, 4096
    n_blocks = 64
    rows = np.random.default_rng(5).integers(0, 256, (n_blocks * br, rb), dtype=np.uint8)
    path = tmp_path / "t.rows"
    write_layout(path, rows, br, stride)
    fd, m, addr = _warm_map(path)
    try:
        os.fsync(fd)  # clean pages can be dropped
        blocks = np.arange(0, n_blocks, 3)
        lens = np.full(blocks.size, br * rb, np.int64)
        assert runs._resident(np.int64(addr), blocks, lens, stride, blocks.size)
        os.posix_fadvise(fd, int(blocks[5]) * stride, stride, os.POSIX_FADV_DONTNEED)
        if runs._resident(np.int64(addr), blocks, lens, stride, blocks.size):
            pytest.skip("this file system keeps the page cached after POSIX_FADV_DONTNEED")
        assert not runs._resident(np.int64(addr), blocks[5:6], lens[:1], stride, 1)
        assert runs._resident(np.int64(addr), blocks[:5], lens[:5], stride, 5)
        # the batch's sample (a few blocks) must see the cold file: all of it out but block 3
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.pread(fd, 1, int(blocks[1]) * stride)
        called = []
        real = runs._read

        def spy(*a):
            called.append(True)
            return real(*a)

        monkeypatch.setattr(runs, "_read", spy)
        buf = np.zeros((blocks.size, br * rb), np.uint8)
        assert read_runs(fd, blocks, buf, 0, blocks.size, stride, n_blocks, br * rb, None, addr) == []
        assert called, "a batch with a page out of the cache was copied from the map (one fault per page)"
        for i, b in enumerate(blocks.tolist()):
            assert np.array_equal(buf[i], rows[b * br: (b + 1) * br].reshape(-1))
    finally:
        m.close()
        os.close(fd)


@pytest.mark.parametrize("rb,br,stride", [(264, 15, 4096), (128, 32, 4096), (100, 40, 4000), (6000, 1, 6000)])
def test_warm_rows_copies_each_row_and_checks_each_block_once(tmp_path, rb, br, stride):
    rng = np.random.default_rng(rb + 2)
    rows, n_rows, n_blocks, last_len, (fd, m, addr) = _mapped_table(tmp_path, rng, rb, br, stride, 23 * br + br // 2 + 1)
    crcs = np.array([zlib.crc32(rows[b * br:(b + 1) * br].tobytes()) for b in range(n_blocks)], np.uint32)
    try:
        for trial in range(15):
            ranks = rng.integers(0, n_rows, rng.integers(1, 3 * n_rows))  # repeats and shared blocks
            if trial == 0:
                ranks = np.array([n_rows - 1, 0, n_rows - 1])
            out = np.zeros((ranks.size, rb), np.uint8)
            status, moved, _ = runs.warm_rows(addr, ranks, out, br, rb, stride, n_blocks, last_len, crcs)
            assert status == runs.WARM_OK
            assert np.array_equal(out, rows[ranks])
            blocks = np.unique(ranks // br)
            assert moved == sum(min(br, n_rows - b * br) * rb for b in blocks.tolist())
        bad = crcs.copy()
        bad[7] ^= 1  # block 7's stored checksum no longer matches its bytes
        ranks = np.array([3, 7 * br + 1, 7 * br, n_rows - 1])
        out = np.zeros((4, rb), np.uint8)
        assert runs.warm_rows(addr, ranks, out, br, rb, stride, n_blocks, last_len, bad)[::2] == (runs.WARM_BAD, 7)
        assert runs.warm_rows(addr, ranks, out, br, rb, stride, n_blocks, last_len, None)[0] == runs.WARM_OK
        assert np.array_equal(out, rows[ranks])  # unchecked: copied as they are
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not runs._resident(np.int64(addr), np.array([0]), np.array([br * rb]), stride, 1):
            got = runs.warm_rows(addr, np.arange(0, n_rows, br), np.zeros((n_blocks, rb), np.uint8), br, rb,
                                 stride, n_blocks, last_len, crcs)
            assert got[0] == runs.WARM_COLD
    finally:
        m.close()
        os.close(fd)
