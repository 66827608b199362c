"""A training loop that tells the store its next batches through the data loader (``LookaheadLoader``).

The loop trains a linear read-out and the Engram rows themselves (sparse SGD: each step reads its
rows from the store, and writes the updated rows back with ``store.update``). Against a dense
tensor trained with the same arithmetic, the losses, the read-out and every row must agree; the
store's hit counts must equal the simulator's for the same trace and hint window; and the hints
must have raised the DRAM tier's hits over the same loop without them.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import engram_store
from engram_model.hashing import HashConfig, NgramHasher
from engram_pipeline.lookahead import LookaheadLoader
from engram_pipeline.simulate import simulate
from engram_pipeline.traces import trace_from_arrays

V, B, T, DIM, STEPS, LR = 80, 2, 24, 4, 40, 0.5


def token_batches(seed: int, n: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    p = np.arange(1, V + 1, dtype=float) ** -1.1
    p = p[rng.permutation(V)] / p.sum()
    return [torch.from_numpy(rng.choice(V, size=(B, T), p=p)) for _ in range(n)]


def step(emb: torch.Tensor, w: torch.Tensor, tokens: torch.Tensor):
    """Loss of a linear read-out of the mean Engram row per position; grads for the rows and for w."""
    emb = emb.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    target = tokens.float() / V
    loss = ((emb.mean(dim=2) @ w - target) ** 2).mean()
    loss.backward()
    return loss.item(), emb.grad, w.grad


def sgd_rows(ids: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor):
    """The distinct ``ids`` and their rows after one SGD step (a repeated id sums its gradients)."""
    uniq, inv = torch.unique(ids.reshape(-1), return_inverse=True)
    g = torch.zeros(uniq.numel(), DIM).index_add_(0, inv, grad.reshape(-1, DIM))
    pos = torch.empty(uniq.numel(), dtype=torch.long)
    pos[inv] = torch.arange(inv.numel())  # any occurrence: every copy of a row is the same row
    return uniq, rows.reshape(-1, DIM)[pos] - LR * g


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = HashConfig(compressed_vocab_size=V, table_sizes=(400, 600), max_ngram=3, heads=2, layer_ids=(1,))
    hasher = NgramHasher(cfg)
    rows = hasher.table_rows[1]
    counts = np.zeros(rows, dtype=np.int64)
    for tok in token_batches(1, 60):  # "training counts" from other text of the same law
        counts += np.bincount(hasher.row_ids(tok)[1].reshape(-1).numpy(), minlength=rows)
    order = torch.from_numpy(np.argsort(-counts, kind="stable"))
    table = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(0))
    path = engram_store.write(tmp_path_factory.mktemp("s") / "s", {"layer1": table}, {"layer1": order})
    return hasher, rows, counts, table, path


def train(setup, window: int):
    hasher, rows, counts, table, path = setup
    fresh = path.parent / f"run{window}"  # training writes the rows: every run starts from the same table
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(path, fresh)
    path = fresh
    H, C = 40, 160
    w = torch.zeros(DIM)
    losses = []
    with engram_store.open(path, device="cpu", hbm_bytes=H * DIM * 4, dram_bytes=C * DIM * 4) as store:
        loader = LookaheadLoader(token_batches(2, STEPS), hasher, store, window)
        for tokens, row_ids in loader:
            ids = row_ids[1]
            emb = store.prefetch("layer1", ids).wait()  # [B, T, K, DIM]
            loss, g_rows, g_w = step(emb, w, tokens)
            uniq, new = sgd_rows(ids, emb, g_rows)
            store.update("layer1", uniq, new)
            w = w - LR * g_w
            losses.append(loss)
        stats = store.stats()["layer1"]
        final = store.lookup("layer1", torch.arange(rows))
        hinted = loader.hinted
    return losses, w, final, stats, hinted


def train_dense(setup):
    hasher, rows, counts, table, path = setup
    ref = table.clone()
    w = torch.zeros(DIM)
    losses = []
    for tokens in token_batches(2, STEPS):
        ids = hasher.row_ids(tokens)[1]
        emb = ref[ids]
        loss, g_rows, g_w = step(emb, w, tokens)
        uniq, new = sgd_rows(ids, emb, g_rows)
        ref[uniq] = new
        w = w - LR * g_w
        losses.append(loss)
    return losses, w, ref


@pytest.mark.parametrize("window", [0, 4])
def test_training_through_a_hinting_loader_equals_dense_training(setup, window):
    losses, w, final, _, hinted = train(setup, window)
    ref_losses, ref_w, ref = train_dense(setup)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(final, ref)
    assert hinted == (STEPS if window else 0)


def test_store_hits_with_hints_equal_simulated_and_beat_no_hints(setup):
    hasher, rows, counts, table, path = setup
    trace = trace_from_arrays("loop", {"layer1": rows},
                              [{"layer1": hasher.row_ids(t)[1].numpy()} for t in token_batches(2, STEPS)],
                              counts={"layer1": counts})
    cap = {"layer1": 200}
    for window in (0, 4):
        _, _, _, st, _ = train(setup, window)
        sim = simulate(trace, "ours", cap, hbm_share=0.2, window=1, lookahead=window)
        assert (st["hbm"]["hits"], st["dram"]["hits"]) == (sim.tiers["hbm"], sim.tiers["dram"]), window
        if window == 0:
            plain = st["dram"]["hits"]
    assert st["dram"]["hits"] > plain, (st["dram"]["hits"], plain)
