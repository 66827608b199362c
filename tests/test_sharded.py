"""Sharded tables over torch.distributed (gloo, several processes on 127.0.0.1).

References are independent of the exchange: plain indexing of the full table, and
nn.Embedding + torch.optim.(Sparse)Adam in one process for training.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from engram_store.errors import EngramStoreError, InvalidRowIdsError, UnknownTableError
from engram_store.sharded import (
    LAYOUT_FILE,
    CollectiveOrderError,
    DenseShard,
    PeerFailureError,
    ShardedStore,
    ShardedTableInfo,
    ShardLayoutError,
    global_index,
    local_index,
    open_sharded,
    owner_of,
    read_layout,
    shard_rows,
)

try:  # the store core (issue 3) may not have landed yet
    import engram_store

    HAVE_CORE = hasattr(engram_store, "write") and hasattr(engram_store, "open")
except ImportError:  # pragma: no cover
    HAVE_CORE = False

needs_core = pytest.mark.skipif(not HAVE_CORE, reason="engram_store.write/open not available yet")

# ----------------------------------------------------------------------------- harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, q, pg_timeout):
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=pg_timeout),
        )
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((rank, "err", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_ranks(world, fn, *args, timeout=90.0, pg_timeout=20.0, wait_for=None):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; returns
    ``{rank: result}`` for the ranks in ``wait_for`` (default all). Never leaves processes."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, q, pg_timeout), daemon=True)
             for r in range(world)]
    wait_for = set(range(world)) if wait_for is None else set(wait_for)
    results, errors = {}, {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while wait_for - set(results) - set(errors):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"ranks {sorted(wait_for - set(results) - set(errors))} did not finish in {timeout}s")
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r in wait_for - set(results) - set(errors) if procs[r].exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(f"ranks {dead} died without reporting (exit codes "
                                         f"{[procs[r].exitcode for r in dead]})") from None
                continue
            (results if status == "ok" else errors)[rank] = payload
        if errors:
            raise AssertionError("\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items())))
        return results
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == world else 2)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        q.close()


def _full_tables(seed=0):
    """The reference tables every rank (and the parent) can rebuild: odd row counts so
    shards have different sizes, three dtypes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layer1": torch.randn(1003, 8, generator=g),
        "layer2": torch.randn(517, 4, generator=g).to(torch.float16),
        "layer3": torch.randn(70, 16, generator=g).to(torch.bfloat16),
    }


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _random_ids(rank, n_rows, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    shape = [(2, 3, 4), (17,), (0,), (5, 1), (3, 64)][step % 5]
    ids = torch.randint(0, n_rows, shape, generator=g)
    if ids.numel() > 3:
        ids.view(-1)[:3] = ids.view(-1)[-1]  # duplicates
    return ids


def _check_lookups(store, full, rank, steps=10):
    """Issue several prefetches before waiting (async, ordered) and compare bit-for-bit."""
    checked = 0
    for step in range(steps):
        pending = []
        for name, t in full.items():
            ids = _random_ids(rank, t.shape[0], step)
            pending.append((name, ids, store.prefetch(name, ids)))
        for name, ids, h in pending:
            got = h.wait()
            want = full[name][ids]
            assert got.shape == (*ids.shape, full[name].shape[1]), (got.shape, ids.shape)
            assert got.dtype == want.dtype
            assert torch.equal(_bits(got), _bits(want)), f"rank {rank} table {name} step {step}"
            checked += ids.numel()
    return checked


# ----------------------------------------------------------------------------- rank functions


def _rank_dense_lookups(rank, world):
    full = _full_tables()
    infos = {n: ShardedTableInfo(t.shape[0], t.shape[1], t.dtype) for n, t in full.items()}
    out = {}
    with ShardedStore(DenseShard.from_full(full, rank, world), infos, timeout=20) as store:
        out["checked"] = _check_lookups(store, full, rank)
        # rank 0 asks only for rows it owns, the others for every row: uneven splits
        ids = torch.arange(0, 1003, world) if rank == 0 else torch.arange(1003)
        assert torch.equal(store.lookup("layer1", ids), full["layer1"][ids])
        st = store.stats()["exchange"]
        out["bytes_sent"] = st["bytes_sent"]
        out["exchanges"] = st["exchanges"]
        # invalid ids and tables are refused locally, before any collective
        for bad in (torch.tensor([1003]), torch.tensor([-1]), torch.tensor([0.5])):
            with pytest.raises(InvalidRowIdsError):
                store.prefetch("layer1", bad)
        with pytest.raises(UnknownTableError):
            store.prefetch("nope", torch.tensor([0]))
        # ranks that disagree on the table are all told so, instead of mixing rows
        name = "layer1" if rank == 0 else "layer2"
        with pytest.raises(CollectiveOrderError, match="same tables in the same order"):
            store.lookup(name, torch.tensor([0, 1]))
        with pytest.raises(PeerFailureError, match="cannot be used any more"):
            store.prefetch("layer1", torch.tensor([0]))
    return out


def _rank_store_lookups(rank, world, path):
    full = _full_tables()
    with open_sharded(path, timeout=20) as store:
        assert store.world_size == world
        return _check_lookups(store, full, rank, steps=5)


def _rank_dies(rank, world, mode):
    full = _full_tables()
    infos = {n: ShardedTableInfo(t.shape[0], t.shape[1], t.dtype) for n, t in full.items()}
    store = ShardedStore(DenseShard.from_full(full, rank, world), infos, timeout=5)
    assert torch.equal(store.lookup("layer1", torch.arange(10)), full["layer1"][:10])
    if rank == world - 1:
        if mode == "exit":
            os._exit(3)  # dies without any goodbye
        time.sleep(120)  # hangs: stops calling prefetch (the parent kills it)
    time.sleep(0.5)
    t0 = time.perf_counter()
    try:
        store.lookup("layer1", torch.arange(10))
    except PeerFailureError as exc:
        return {"seconds": time.perf_counter() - t0, "message": str(exc)}
    finally:
        store._pool.shutdown(wait=False)
    raise AssertionError("lookup succeeded although a peer is gone")


def _train_table_ranks(rank, world, lazy, steps):
    from engram_model.sharded_table import ShardedEmbedding

    table = ShardedEmbedding(101, 6, seed=3, lr=0.05, lazy=lazy, timeout=20)
    for step in range(steps):
        ids, target = _train_batch(rank, step)
        loss = ((table(ids) - target) ** 2).mean()
        loss.backward()
        table.step()
        table.zero_grad()
    return table.full_weight().numpy()


def _train_batch(rank, step):
    g = torch.Generator().manual_seed(77 + 31 * step + rank)
    ids = torch.randint(0, 101, (4, 5), generator=g)
    ids[0, 0] = ids[1, 1]  # a duplicate inside the batch
    return ids, torch.randn(4, 5, 6, generator=g)


def _reference_table_training(world, lazy, steps):
    """nn.Embedding in one process: the loss is the mean of the ranks' losses (what DDP-style
    averaging computes), trained with SparseAdam (lazy) or Adam (dense)."""
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.Embedding(101, 6, sparse=lazy)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(101, 6, generator=g) * 0.02)
    opt = (torch.optim.SparseAdam if lazy else torch.optim.Adam)(emb.parameters(), lr=0.05)
    for step in range(steps):
        loss = sum(((emb(ids) - target) ** 2).mean() for ids, target in (_train_batch(r, step) for r in range(world)))
        (loss / world).backward()
        opt.step()
        opt.zero_grad()
    return emb.weight.detach()


# ----------------------------------------------------------------------------- tests: no processes


def test_owner_function_partitions_rows():
    rows = torch.arange(1003)
    for n in (1, 2, 3, 4):
        own, loc = owner_of(rows, n), local_index(rows, n)
        assert torch.equal(global_index(loc, own, n), rows)
        for i in range(n):
            mine = rows[own == i]
            assert mine.numel() == shard_rows(1003, i, n)
            assert torch.equal(local_index(mine, n), torch.arange(mine.numel()))
    # frequency-ordered tables have their hot rows first: modulo spreads the top ranks evenly
    assert torch.bincount(owner_of(torch.arange(100), 4)).tolist() == [25, 25, 25, 25]


def test_single_process_store_matches_full_table():
    full = _full_tables()
    infos = {n: ShardedTableInfo(t.shape[0], t.shape[1], t.dtype) for n, t in full.items()}
    with ShardedStore(DenseShard.from_full(full, 0, 1), infos) as store:
        assert store.world_size == 1
        assert _check_lookups(store, full, 0, steps=5) > 0


def test_layout_with_other_owner_function_is_refused(tmp_path):
    layout = {"format": "engram-store-shards", "version": 1, "n_shards": 2, "owner": "contiguous_ranges",
              "layout_id": "x", "tables": {}}
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.raises(ShardLayoutError, match="owner function 'contiguous_ranges'"):
        read_layout(tmp_path)
    with pytest.raises(EngramStoreError, match="not a sharded store"):
        read_layout(tmp_path / "missing")


def test_rank_count_mismatch_is_refused(tmp_path):
    layout = {"format": "engram-store-shards", "version": 1, "n_shards": 2, "owner": "row_mod_n",
              "layout_id": "x", "tables": {}}
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.raises(ShardLayoutError, match="built with 2 shard"):
        open_sharded(tmp_path)  # one process, no process group: world size 1


@pytest.mark.parametrize("lazy", [True, False])
def test_sharded_embedding_world1_matches_reference(lazy):
    from engram_model.sharded_table import ShardedEmbedding

    table = ShardedEmbedding(101, 6, seed=3, lr=0.05, lazy=lazy)
    for step in range(4):
        ids, target = _train_batch(0, step)
        ((table(ids) - target) ** 2).mean().backward()
        table.step()
        table.zero_grad()
    torch.testing.assert_close(table.full_weight(), _reference_table_training(1, lazy, 4), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- tests: gloo processes


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_lookups_equal_full_table(world):
    results = run_ranks(world, _rank_dense_lookups)
    assert all(r["checked"] > 1000 for r in results.values())
    assert all(r["bytes_sent"] > 0 for r in results.values())


@pytest.mark.distributed
@needs_core
@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_store_lookups_equal_single_process(tmp_path, backend, world):
    from engram_store.sharded import join_shards, write_shards

    full = _full_tables()
    order = {n: torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(5)) for n, t in full.items()}
    path = write_shards(tmp_path / "s", full, order, world, backend=backend)
    joined = join_shards(path)
    assert all(torch.equal(_bits(joined[n]), _bits(full[n])) for n in full)
    # the single-process store of the same tables gives the same rows
    single = engram_store.open(engram_store.write(tmp_path / "one", full, order, backend=backend))
    try:
        for n, t in full.items():
            ids = torch.randint(0, t.shape[0], (200,))
            assert torch.equal(_bits(single.lookup(n, ids)), _bits(t[ids]))
    finally:
        single.close()
    results = run_ranks(world, _rank_store_lookups, str(path))
    assert all(v > 0 for v in results.values())


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_rank_fails_others_with_clear_error(mode):
    t0 = time.monotonic()
    results = run_ranks(2, _rank_dies, mode, pg_timeout=5, wait_for=[0], timeout=60)
    r = results[0]
    assert r["seconds"] < 30, r
    assert "peer rank died" in r["message"]
    assert time.monotonic() - t0 < 60


@pytest.mark.distributed
def test_sharded_embedding_training_equals_one_process():
    steps = 5
    for lazy in (True, False):
        results = run_ranks(2, _train_table_ranks, lazy, steps)
        want = _reference_table_training(2, lazy, steps)
        for rank, got in results.items():
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)
        assert (want - _reference_table_training(2, lazy, 0)).abs().max() > 1e-3  # it did train
