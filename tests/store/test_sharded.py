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

# Exchange and process-group timeout of the tests that expect no failure: generous, because on a
# shared 2-core machine four ranks of a loaded run can stall past 20 s (seen); a failure still ends them.
LOAD_TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, q, pg_timeout, backend):
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
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


def run_ranks(world, fn, *args, timeout=180.0, pg_timeout=LOAD_TIMEOUT, wait_for=None, backend="gloo"):
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; returns
    ``{rank: result}`` for the ranks in ``wait_for`` (default all). Never leaves processes."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, q, pg_timeout, backend), daemon=True)
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
    with ShardedStore(DenseShard.from_full(full, rank, world), infos, timeout=LOAD_TIMEOUT) as store:
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


def _rank_lookups(rank, world, paths):
    """Dense shards first (no store core needed), then the sharded stores of each backend."""
    out = {"dense": _rank_dense_lookups(rank, world)}
    full = _full_tables()
    for backend, path in paths.items():
        with open_sharded(path, timeout=LOAD_TIMEOUT) as store:
            assert store.world_size == world
            out[backend] = _check_lookups(store, full, rank, steps=5)
    return out


def _rank_dies(rank, world, mode):
    full = _full_tables()
    infos = {n: ShardedTableInfo(t.shape[0], t.shape[1], t.dtype) for n, t in full.items()}
    store = ShardedStore(DenseShard.from_full(full, rank, world), infos, timeout=4)
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

    table = ShardedEmbedding(101, 6, seed=3, lr=0.05, lazy=lazy, timeout=LOAD_TIMEOUT)
    for step in range(steps):
        ids, target = _train_batch(rank, step)
        loss = ((table(ids) - target) ** 2).mean()
        loss.backward()
        table.step()
        table.zero_grad()
    return table.full_weight().numpy()


LM_TEXT = ["def add(a, b):\n    return a + b\n", "class Thing:\n    '''A Thing.'''\n    pass\n"] * 20
LM_LR, LM_STEPS = 3e-3, 4


def _tiny_lm():
    from engram_model.bpe import train_bpe
    from engram_model.compression import CompressedTokenizer
    from engram_model.model import EngramLM, ModelConfig

    tok = train_bpe(LM_TEXT, vocab_size=300)
    comp = CompressedTokenizer.from_tokenizer(tok)
    cfg = ModelConfig(vocab_size=comp.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                      engram_layers=(1,), engram_table_sizes=(50, 40), engram_heads=2, engram_head_dim=4)
    torch.manual_seed(0)
    return EngramLM(cfg, comp)


def _lm_batch(step, vocab):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randint(2, vocab, (4, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _lm_optimizer(model):
    """The training setup of engram_model.train: AdamW (decay on matrices), betas (0.9, 0.95);
    the memory rows in their own group: Adam at 5x the learning rate, no weight decay."""
    mem, decay, no_decay = model.param_groups()
    groups = [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)]
    if mem:
        groups.append(dict(params=mem, weight_decay=0.0, lr=LM_LR * 5))
    return torch.optim.AdamW(groups, lr=LM_LR, betas=(0.9, 0.95), eps=1e-8)


def _lm_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("tables.")}


def _train_lm_ranks(rank, world):
    """EngramLM data-parallel over ranks: dense grads all-reduced (mean), the Engram table sharded."""
    from engram_model.sharded_table import ShardedEmbedding, clip_grad_norm_

    model = _tiny_lm()
    w = model.tables["layer1"].weight.detach()
    table = ShardedEmbedding(w.shape[0], w.shape[1], weight=w, lr=LM_LR * 5, betas=(0.9, 0.95), eps=1e-8,
                             lazy=False, timeout=LOAD_TIMEOUT)
    model.set_memory({1: table})
    opt = _lm_optimizer(model)
    per = 4 // world
    losses = []
    for step in range(LM_STEPS):
        x, y = _lm_batch(step, model.config.vocab_size)
        loss = model.loss(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        opt.zero_grad(set_to_none=True)
        table.zero_grad()
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        clip_grad_norm_(model.parameters(), [table], 1.0)
        opt.step()
        table.step()
        losses.append(float(loss.detach()))
    state = {k: v.numpy() for k, v in _lm_state(model).items()}
    return {"state": state, "table": table.full_weight().numpy(), "losses": losses,
            "bytes": table.exchange_stats()["bytes_sent"]}


def _reference_lm_training():
    model = _tiny_lm()
    before = model.tables["layer1"].weight.detach().clone()
    opt = _lm_optimizer(model)
    for step in range(LM_STEPS):
        x, y = _lm_batch(step, model.config.vocab_size)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return _lm_state(model), model.tables["layer1"].weight.detach(), before


def _rank_training(rank, world, steps):
    out = {"table": {lazy: _train_table_ranks(rank, world, lazy, steps) for lazy in (True, False)}}
    out["lm"] = _train_lm_ranks(rank, world)
    return out


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


def _write_sharded(tmp_path, world, backends):
    from engram_store.sharded import join_shards, write_shards

    full = _full_tables()
    order = {n: torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(5)) for n, t in full.items()}
    paths = {}
    for backend in backends:
        paths[backend] = str(write_shards(tmp_path / backend, full, order, world, backend=backend))
        joined = join_shards(paths[backend])
        assert all(torch.equal(_bits(joined[n]), _bits(full[n])) for n in full)
        # the single-process store of the same tables serves the same rows as plain indexing
        with engram_store.open(engram_store.write(tmp_path / f"one-{backend}", full, order, backend=backend),
                               device="cpu") as single:
            for n, t in full.items():
                ids = torch.randint(0, t.shape[0], (200,))
                assert torch.equal(_bits(single.lookup(n, ids)), _bits(t[ids]))
    return paths


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_lookups_equal_single_process(tmp_path, world):
    """Bit-for-bit against the full table on random ids: dense shards, mmap and lmdb shard stores."""
    paths = _write_sharded(tmp_path, world, ("mmap", "lmdb")) if HAVE_CORE else {}
    results = run_ranks(world, _rank_lookups, paths)
    for r in results.values():
        assert r["dense"]["checked"] > 1000 and r["dense"]["bytes_sent"] > 0
        assert all(r[b] > 500 for b in paths)
    if not HAVE_CORE:
        pytest.skip("dense shards checked; engram_store.write/open not available for the store backends")


@needs_core
def test_write_shards_layout_and_atomicity(tmp_path):
    from engram_store.sharded import join_shards, write_shards

    full = _full_tables()
    path = write_shards(tmp_path / "s", full, None, 3)
    layout = read_layout(path)
    assert layout["n_shards"] == 3 and layout["owner"] == "row_mod_n"
    assert sorted(p.name for p in path.iterdir()) == ["shard-0-of-3", "shard-1-of-3", "shard-2-of-3", LAYOUT_FILE]
    with engram_store.open(path / "shard-1-of-3", device="cpu") as shard:
        assert shard.manifest["tier_plan"]["shard"]["index"] == 1
        assert shard.tables["layer1"].rows == shard_rows(1003, 1, 3) == 334
        assert torch.equal(shard.lookup("layer1", torch.arange(334)), full["layer1"][1::3])
    with pytest.raises(EngramStoreError, match="overwrite"):
        write_shards(path, full, None, 2)
    with pytest.raises(ValueError, match="order"):  # fails after the temporary dir exists
        write_shards(path, full, {"layer1": torch.arange(5)}, 2, overwrite=True)
    assert read_layout(path)["n_shards"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    write_shards(path, full, None, 2, overwrite=True)
    assert read_layout(path)["n_shards"] == 2
    assert torch.equal(join_shards(path)["layer2"].view(torch.int16), full["layer2"].view(torch.int16))
    # a shard from another build is detected
    other = write_shards(tmp_path / "t", full, None, 2)
    import shutil

    shutil.rmtree(path / "shard-1-of-2")
    shutil.copytree(other / "shard-1-of-2", path / "shard-1-of-2")
    with pytest.raises(ShardLayoutError, match="different builds"):
        join_shards(path)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_rank_fails_others_with_clear_error(mode):
    t0 = time.monotonic()
    results = run_ranks(2, _rank_dies, mode, pg_timeout=4, wait_for=[0], timeout=60)
    r = results[0]
    assert r["seconds"] < 30, r
    assert "peer rank died" in r["message"]
    assert time.monotonic() - t0 < 60


@pytest.mark.distributed
def test_sharded_training_equals_one_process():
    """2 ranks vs one process: the table alone (SparseAdam / Adam references) and EngramLM
    with the paper's optimizer setup (separate Adam group for the memory rows, 5x lr)."""
    steps = 5
    results = run_ranks(2, _rank_training, steps)
    for lazy in (True, False):
        want = _reference_table_training(2, lazy, steps)
        assert (want - _reference_table_training(2, lazy, 0)).abs().max() > 1e-3  # it did train
        for r in results.values():
            torch.testing.assert_close(torch.from_numpy(r["table"][lazy]), want, rtol=1e-5, atol=1e-6)
    state, table, before = _reference_lm_training()
    assert (table - before).abs().max() > 1e-3
    for r in results.values():
        lm = r["lm"]
        assert lm["bytes"] > 0
        # Row gradients are summed across ranks in another order than in one process; Adam divides
        # by sqrt(v), so rows with tiny gradients amplify that float32 rounding: 5 steps at the
        # memory rows' lr (1.5e-2) leave differences up to ~2e-5 (0.1% of one step; measured 1.8e-5).
        torch.testing.assert_close(torch.from_numpy(lm["table"]), table, rtol=1e-4, atol=5e-5)
        assert lm["state"].keys() == state.keys()
        for k, v in state.items():
            # Same rounding, amplified by AdamW on near-zero gradients (biases start at 0): ~1e-5 seen.
            torch.testing.assert_close(torch.from_numpy(lm["state"][k]), v, rtol=1e-4, atol=5e-5, msg=k)


def _rank_cuda_lookups(rank, world):
    """Shards on the GPU; on NCCL the ids and rows cross as device tensors."""
    full = _full_tables()
    infos = {n: ShardedTableInfo(t.shape[0], t.shape[1], t.dtype) for n, t in full.items()}
    local = DenseShard.from_full({n: t.cuda() for n, t in full.items()}, rank, world)
    with ShardedStore(local, infos, device="cuda", timeout=LOAD_TIMEOUT) as store:
        store._exchange.short_circuit = False  # run the collectives even with one rank
        n = 0
        for step in range(5):
            for name, t in full.items():
                ids = _random_ids(rank, t.shape[0], step)
                got = store.lookup(name, ids.cuda() if step % 2 else ids)
                assert got.device.type == "cuda"
                assert torch.equal(_bits(got.cpu()), _bits(t[ids]))
                n += ids.numel()
        return {"checked": n, "backend": store._exchange.backend, "bytes": store.stats()["exchange"]["bytes_sent"]}


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("backend,world", [("nccl", 1), ("gloo", 2)])
def test_cuda_shards_match_cpu(backend, world):
    """NCCL needs one GPU per rank (one GPU here: world 1, collectives forced); gloo ranks may
    share a GPU (rows on the device, exchange through the host)."""
    results = run_ranks(world, _rank_cuda_lookups, backend=backend)
    assert all(r["checked"] > 100 and r["backend"] == backend for r in results.values())


# ----------------------------------------------------------------------------- head_ranges owners, streaming


HEAD_ROWS = {"layer1": [100, 301, 2, 600], "layer2": [17, 200, 150, 150], "layer3": [10, 20, 30, 10]}
TRAIN_HEADS = [20, 31, 25, 25]  # the 101-row training table as 4 heads


def _head_owners(world):
    from engram_store.sharded import HeadRanges

    return {n: HeadRanges(h, world) for n, h in HEAD_ROWS.items()}


def test_head_ranges_split_whole_heads():
    from engram_store.sharded import HeadRanges, make_owner, split_heads

    assert split_heads(24, 4) == [(0, 6), (6, 12), (12, 18), (18, 24)]  # V4.1: 6 of a layer's 24 heads per rank
    assert split_heads(5, 2) == [(0, 3), (3, 5)]  # uneven: the first K % W ranks get one more
    heads = [7, 3, 5, 11, 2]
    o = HeadRanges(heads, 2)
    assert o.ranges == [(0, 15), (15, 28)] and o.rows == 28
    rows = torch.arange(28)
    own, loc = o.owner_of(rows), o.local_index(rows)
    # plain-loop reference: the head each row falls in, and that head's rank
    starts = np.cumsum([0] + heads)
    for r in range(28):
        head = int(np.searchsorted(starts, r, side="right") - 1)
        rank = 0 if head < 3 else 1
        assert int(own[r]) == rank and int(loc[r]) == r - (0 if rank == 0 else 15)
    for s in range(2):
        mine = rows[own == s]
        assert mine.numel() == o.shard_rows(s)
        assert torch.equal(o.global_index(o.local_index(mine), s), mine)
    with pytest.raises(EngramStoreError, match="only 5 heads"):
        HeadRanges(heads, 6)
    with pytest.raises(EngramStoreError, match="head_rows"):
        make_owner("head_ranges", 28, 2, None, "t")
    with pytest.raises(EngramStoreError, match="sum to 28"):
        make_owner("head_ranges", 29, 2, heads, "t")
    with pytest.raises(EngramStoreError, match="unknown owner function"):
        make_owner("contiguous", 28, 2, heads, "t")


def _reference_shard(t, order, owner, s):
    """Shard ``s``'s rows in its rank order, by a plain loop over the global order (today's rule:
    each shard keeps its rows in the global rank order)."""
    o = range(t.shape[0]) if order is None else order.tolist()
    mine = [row for row in o if int(owner.owner_of(torch.tensor(row))) == s]
    return t[torch.tensor(mine, dtype=torch.int64)]


@needs_core
@pytest.mark.parametrize("owner", ["row_mod_n", "head_ranges"])
@pytest.mark.parametrize("with_order", [False, True])
def test_streaming_write_and_join_equal_reference(tmp_path, owner, with_order):
    """Tiny chunks and buckets (the two-pass permutation with many buckets) against a plain loop."""
    from engram_store.sharded import join_shards, make_owner, owners_of, write_shards

    full = _full_tables()
    g = torch.Generator().manual_seed(9)
    order = {n: torch.randperm(t.shape[0], generator=g) for n, t in full.items()} if with_order else None
    world = 3 if owner == "row_mod_n" else 2
    ticks = []
    path = write_shards(tmp_path / "s", full, order, world, owner=owner,
                        head_rows=HEAD_ROWS if owner == "head_ranges" else None,
                        chunk_bytes=700, bucket_bytes=1000, progress=ticks.append)
    assert sum(ticks) == sum(t.numel() * t.element_size() for t in full.values()) * (2 if with_order else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no scratch or partial directory left
    layout = read_layout(path)
    assert layout["owner"] == owner
    owners = owners_of(layout)
    for n, t in full.items():
        assert owners[n] == make_owner(owner, t.shape[0], world, HEAD_ROWS[n], n)
        if owner == "head_ranges":
            assert layout["tables"][n]["ranges"] == [list(r) for r in owners[n].ranges]
    for s in range(world):
        with engram_store.open(path / f"shard-{s}-of-{world}", device="cpu") as shard:
            for n, t in full.items():
                want = _reference_shard(t, None if order is None else order[n], owners[n], s)
                assert torch.equal(_bits(shard.read_ranks(n, 0, want.shape[0])), _bits(want)), (n, s)
    joined = join_shards(path, chunk_bytes=300, bucket_bytes=900)
    assert all(torch.equal(_bits(joined[n]), _bits(full[n])) for n in full)
    chunks = []
    join_shards(path, sink=lambda n, a, b, rows: chunks.append((n, a, b, rows.clone())), bucket_bytes=900)
    for n, t in full.items():
        got = [c for c in chunks if c[0] == n]
        assert [c[1] for c in got] == [0] + [c[2] for c in got[:-1]] and got[-1][2] == t.shape[0]
        assert torch.equal(_bits(torch.cat([c[3] for c in got])), _bits(t))
    rank = {n: torch.randperm(t.shape[0], generator=g) for n, t in full.items()}
    out = join_shards(path, tmp_path / "joined", order=rank, bucket_bytes=900)
    with engram_store.open(out, device="cpu") as one:
        for n, t in full.items():
            assert torch.equal(_bits(one.read_ranks(n, 0, t.shape[0])), _bits(t[rank[n]]))
            assert torch.equal(_bits(one.lookup(n, torch.arange(t.shape[0]))), _bits(t))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joined", "s"]


@needs_core
def test_streaming_write_failure_leaves_old_store(tmp_path):
    """A source that fails halfway: nothing half-written, the old sharded store intact, no leftovers."""
    from engram_store.sharded import RangeSource, TableSpec, join_shards, write_shards

    full = _full_tables()
    path = write_shards(tmp_path / "s", full, None, 2)

    def read(name, a, b):
        if a > 500:
            raise OSError("disk went away")
        return full[name][a:b]

    source = RangeSource({n: TableSpec(t.shape[0], t.shape[1], t.dtype) for n, t in full.items()}, read)
    order = {"layer1": torch.randperm(1003)}
    for o in (None, order):
        with pytest.raises(OSError, match="went away"):
            write_shards(path, source, o, 4, owner="head_ranges", head_rows=HEAD_ROWS, chunk_bytes=1000,
                         bucket_bytes=2000, overwrite=True)
        assert read_layout(path)["n_shards"] == 2
        assert all(torch.equal(_bits(v), _bits(full[k])) for k, v in join_shards(path).items())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    bad = RangeSource({"layer1": TableSpec(1003, 8, torch.float32)}, lambda n, a, b: full["layer2"][a:b])
    with pytest.raises(EngramStoreError, match="the source gave"):
        write_shards(tmp_path / "t", bad, None, 2)
    with pytest.raises(EngramStoreError, match="head_rows"):
        write_shards(tmp_path / "t", full, None, 2, owner="head_ranges")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_head_ranges_layout_tampering_is_refused(tmp_path):
    from engram_store.errors import StoreCorruptError

    base = {"format": "engram-store-shards", "version": 1, "n_shards": 2, "owner": "head_ranges", "layout_id": "x",
            "tables": {"t": {"rows": 28, "dim": 4, "dtype": "float32", "head_rows": [7, 3, 5, 11, 2],
                             "ranges": [[0, 15], [15, 28]]}}}
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(base))
    assert read_layout(tmp_path)["owner"] == "head_ranges"
    for change in ({"ranges": [[0, 10], [10, 28]]}, {"head_rows": [7, 3, 5, 11]}, {"head_rows": "x"},
                   {"rows": 30}, {"ranges": None}):
        bad = json.loads(json.dumps(base))
        bad["tables"]["t"].update(change)
        (tmp_path / LAYOUT_FILE).write_text(json.dumps(bad))
        with pytest.raises(StoreCorruptError, match="rebuild"):
            read_layout(tmp_path)


# -- V4.1-format checkpoint, sharded by whole heads

V41_VOCAB = 1000  # 24 heads x ~1k rows per layer


@pytest.fixture(scope="module")
def v41_sharded(tmp_path_factory):
    """A generated V4.1 checkpoint built as a 4-way head_ranges sharded store (rank order from counts)
    through the pipeline, the path of `engram-store build --checkpoint HF --shards 4 --owner head_ranges`."""
    from engram_pipeline.build import build_from_checkpoint
    from engram_pipeline.counts import Counts
    from engram_pipeline.hf_checkpoint import open_hf_checkpoint
    from engram_pipeline.v41_checkpoint import write_v41_checkpoint

    root = tmp_path_factory.mktemp("v41s")
    ckpt = root / "ckpt"
    write_v41_checkpoint(ckpt, engram_vocab_size=V41_VOCAB, progress=False)
    with open_hf_checkpoint(ckpt) as ck:
        rng = np.random.default_rng(0)
        tables = {n: rng.zipf(1.3, t.rows).clip(0, 10_000).astype(np.uint32) for n, t in ck.tables.items()}
        counts = Counts(ck.fingerprint, tables, ck.hash_config.to_dict(), {n: 264 for n in tables}, 1, 1)
        primes = ck.hasher().primes
    report = build_from_checkpoint(ckpt, counts, root / "sharded", hbm_bytes=0, dram_bytes=1 << 20, shards=4,
                                   owner="head_ranges", progress=False)
    return {"ckpt": ckpt, "store": root / "sharded", "counts": counts, "primes": primes, "report": report}


@needs_core
def test_v41_sharded_build_by_heads_equals_generator(v41_sharded):
    from engram_pipeline.v41_checkpoint import expected_rows
    from engram_store.format.fp8_rows import FORMAT_NAME
    from engram_store.sharded import owners_of

    path, ckpt = v41_sharded["store"], v41_sharded["ckpt"]
    layout = read_layout(path)
    assert layout["owner"] == "head_ranges" and layout["n_shards"] == 4 and v41_sharded["report"]["shards"] == 4
    owners = owners_of(layout)
    g = np.random.default_rng(1)
    for name, m in layout["tables"].items():
        assert m["row_format"] == FORMAT_NAME and m["dim"] == 264 and m["dtype"] == "uint8"
        heads = [p for per_order in v41_sharded["primes"][int(name.removeprefix("layer"))] for p in per_order]
        starts = np.cumsum([0] + heads)
        # rank r owns heads 6r..6r+5: rows [offset[6r], offset[6r + 6])
        assert m["ranges"] == [[int(starts[6 * r]), int(starts[6 * r + 6])] for r in range(4)]
        order = v41_sharded["counts"].order(name)
        for s in range(4):
            with engram_store.open(path / f"shard-{s}-of-4", device="cpu") as shard:
                a, b = m["ranges"][s]
                ids = torch.from_numpy(g.integers(a, b, 2000))
                got = shard.lookup(name, ids - a, dequantize=False)
                assert torch.equal(got, expected_rows(ckpt, name, ids)), (name, s)
                # rank order inside the shard: the counts' order restricted to the shard's rows
                mine = order[(order >= a) & (order < b)]
                assert torch.equal(shard.read_ranks(name, 0, 500), expected_rows(ckpt, name, mine[:500]))


def _rank_head_ranges(rank, world, steps, paths, v41):
    """head_ranges at ``world`` ranks: dense shards and real shard stores against plain indexing, the
    V4.1 sharded store against the generator (packed and decoded), and training the table by heads."""
    from engram_model.sharded_table import ShardedEmbedding
    from engram_store.format.fp8_rows import dequantize
    from engram_store.sharded import HeadRanges

    full = _full_tables()
    owners = _head_owners(world)
    infos = {n: ShardedTableInfo(t.shape[0], t.shape[1], t.dtype, owners[n]) for n, t in full.items()}
    out = {}
    with ShardedStore(DenseShard.from_full(full, rank, world, owners), infos, timeout=LOAD_TIMEOUT) as store:
        out["dense"] = _check_lookups(store, full, rank, steps=4)
        st = store.stats()["exchange"]
        # a rank's ids inside its own heads never leave it (the point of head ranges)
        a, b = owners["layer1"].ranges[rank]
        before = store.stats()["exchange"]["bytes_sent"]
        assert torch.equal(store.lookup("layer1", torch.arange(a, b)), full["layer1"][a:b])
        out["own_heads_bytes"] = store.stats()["exchange"]["bytes_sent"] - before - 24 * (world - 1)
        out["bytes_sent"] = st["bytes_sent"]
    for backend, path in paths.items():
        with open_sharded(path, timeout=LOAD_TIMEOUT) as store:
            out[backend] = _check_lookups(store, full, rank, steps=3)
    if v41 is not None:
        from engram_pipeline.v41_checkpoint import expected_rows

        with open_sharded(v41, timeout=LOAD_TIMEOUT) as store:
            n = 0
            for name, info in store.tables.items():
                ids = torch.randint(0, info.rows, (3, 700), generator=torch.Generator().manual_seed(rank))
                packed = store.lookup(name, ids, dequantize=False)
                want = expected_rows(v41.parent / "ckpt", name, ids)
                assert torch.equal(packed, want), name
                assert torch.equal(_bits(store.lookup(name, ids)), _bits(dequantize(want))), name
                n += ids.numel()
            out["v41"] = n
    out["table"] = {}
    for lazy in (True, False):
        table = ShardedEmbedding(101, 6, seed=3, lr=0.05, lazy=lazy, timeout=LOAD_TIMEOUT, owner=HeadRanges(TRAIN_HEADS, world))
        assert table.local_weight.shape[0] == table.owner.shard_rows(rank)
        for step in range(steps):
            ids, target = _train_batch(rank, step)
            ((table(ids) - target) ** 2).mean().backward()
            table.step()
            table.zero_grad()
        out["table"][lazy] = table.full_weight().numpy()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks: ~50 s on 2 cores
def test_head_ranges_lookups_and_training_equal_one_process(tmp_path, world, request):
    """head_ranges next to the row_mod_n tests above: lookups bit for bit (dense shards, mmap and lmdb
    shard stores, and at 4 ranks the V4.1 store sharded by whole heads) and training equal to one process."""
    from engram_store.sharded import write_shards

    steps = 4
    paths = {}
    if HAVE_CORE:
        full = _full_tables()
        order = {n: torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(5)) for n, t in full.items()}
        for backend in ("mmap", "lmdb"):
            paths[backend] = str(write_shards(tmp_path / backend, full, order, world, owner="head_ranges",
                                              head_rows=HEAD_ROWS, backend=backend))
    v41 = request.getfixturevalue("v41_sharded")["store"] if HAVE_CORE and world == 4 else None
    results = run_ranks(world, _rank_head_ranges, steps, paths, v41, timeout=240)
    for lazy in (True, False):
        want = _reference_table_training(world, lazy, steps)
        for r in results.values():
            torch.testing.assert_close(torch.from_numpy(r["table"][lazy]), want, rtol=1e-5, atol=1e-6)
    for r in results.values():
        assert r["dense"] == 138 and r["bytes_sent"] > 0 and r["own_heads_bytes"] == 0
        assert all(r[b] == 123 for b in paths)
        if v41 is not None:
            assert r["v41"] == 2 * 2100


@needs_core
def test_cli_build_shards_owner_head_ranges(v41_sharded, tmp_path, capsys):
    """`engram-store build --checkpoint HF --shards 2 --owner head_ranges` (no counts: checkpoint order),
    every row of every shard against the generator; --owner without --shards is refused."""
    from engram_pipeline.v41_checkpoint import expected_rows
    from engram_store_cli.cli import main

    ckpt, out = v41_sharded["ckpt"], tmp_path / "s"
    assert main(["build", "--checkpoint", str(ckpt), "--shards", "2", "--owner", "head_ranges", "-o", str(out),
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["owner"] == "head_ranges"
    layout = read_layout(out)
    for name, m in layout["tables"].items():
        for s, (a, b) in enumerate(m["ranges"]):
            with engram_store.open(out / f"shard-{s}-of-2", device="cpu") as shard:
                assert torch.equal(shard.read_ranks(name, 0, b - a), expected_rows(ckpt, name, torch.arange(a, b)))
    assert main(["build", "--checkpoint", str(ckpt), "--owner", "head_ranges", "-o", str(tmp_path / "t")]) == 2
    assert "--shards" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@needs_core
def test_cli_convert_joins_a_sharded_store(tmp_path):
    """`engram-store convert SHARDED -o STORE --backend B`: one store in global row order (streaming join)."""
    from engram_store.sharded import write_shards
    from engram_store_cli.cli import main

    full = _full_tables()
    src = write_shards(tmp_path / "s", full, None, 2, owner="head_ranges", head_rows=HEAD_ROWS)
    assert main(["convert", str(src), "-o", str(tmp_path / "one"), "--backend", "lmdb"]) == 0
    with engram_store.open(tmp_path / "one", device="cpu") as one:
        assert one.manifest["backend"] == "lmdb"
        for n, t in full.items():
            assert torch.equal(_bits(one.lookup(n, torch.arange(t.shape[0]))), _bits(t))
