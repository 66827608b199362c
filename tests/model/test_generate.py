"""KV-cache decoding equals the full-sequence forward, with the tables in memory and from the store.

Reference: ``model(ids)`` over the whole sequence. Decoding runs prefill on a prefix and then
one token (or a chunk) at a time; the logits of every position are compared. The short conv
has non-zero weights and Engram sits at blocks 0 and 2, so a wrong N-gram context, conv state,
position or K/V cache shows up as a large difference, not a rounding one.
"""

from __future__ import annotations

import pytest
import torch

from engram_model.checkpoint import load_checkpoint
from engram_model.generate import generate, init_state, prefill, step
from engram_model.serving import load_served
from engram_store.errors import EngramStoreError
from test_serving import batches, build_store, table_bytes, tiny_checkpoint

TOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    _, ckpt = tiny_checkpoint(root / "ckpt")
    build_store(ckpt, root / "store", "mmap")
    return root, ckpt


def decode_logits(model, x: torch.Tensor, prompt: int, chunk: int = 1) -> torch.Tensor:
    state, first = prefill(model, x[:, :prompt])
    out = [first]
    for t in range(prompt, x.shape[1], chunk):
        out.append(step(model, state, x[:, t:t + chunk]))
    assert state.pos == x.shape[1]
    return torch.cat(out, dim=1)


def check(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    diff = (got - want).abs()
    print(f"{what}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
    assert diff.max().item() <= TOL, f"{what}: max abs diff {diff.max().item():g} > {TOL}"
    return diff.max().item()


@pytest.mark.parametrize("prompt,chunk", [(1, 1), (2, 1), (7, 1), (5, 3)])
def test_decode_equals_full_forward(world, prompt, chunk):
    _, ckpt = world
    model = ckpt.model
    for x in batches(model.config.vocab_size, n=2, T=model.config.max_seq_len):
        with torch.no_grad():
            want = model(x)
        check(decode_logits(model, x, prompt, chunk), want, f"in memory, prompt {prompt}, chunk {chunk}")


def test_decode_from_store_equals_full_forward(world):
    root, ckpt = world
    total = table_bytes(ckpt)
    model, store = load_served(root / "ckpt", root / "store", hbm_bytes=total // 10, dram_bytes=total // 8)
    with store:
        for x in batches(model.config.vocab_size, n=2, T=model.config.max_seq_len, seed=5):
            with torch.no_grad():
                served, mem = model(x), ckpt.model(x)
            assert torch.equal(served, mem)
            got = decode_logits(model, x, prompt=3)
            check(got, mem, "from the store, prompt 3")
        s = store.stats()["layer0"]
        assert s["disk"]["rows"] > 0 and s["dram"]["evictions"] > 0


def test_prefetch_before_blocks_and_wait_at_layer(world):
    """Every Engram layer's rows are requested before block 0 runs; each wait comes at its own layer."""
    _, ckpt = world
    model = load_checkpoint(world[0] / "ckpt").model
    events = []

    class Recording:
        def __init__(self, inner, L):
            self.inner, self.L, self.rows, self.dim = inner, L, inner.rows, inner.dim

        def prefetch(self, ids):
            events.append(("prefetch", self.L, tuple(ids.shape)))
            pending = self.inner.prefetch(ids)

            class P:
                def done(_):
                    return True

                def wait(_):
                    events.append(("wait", self.L))
                    return pending.wait()
            return P()

    model.tok_emb.register_forward_pre_hook(lambda m, a: events.append(("embed",)))
    for i, block in enumerate(model.blocks):  # norm1 runs in the full forward and in step alike
        block.norm1.register_forward_pre_hook(lambda m, a, i=i: events.append(("block", i)))
    tables = {L: Recording(t, L) for L, t in model.memory().items()}
    model.set_memory(tables)
    x = batches(model.config.vocab_size, n=1, B=2, T=6)[0]
    K = model.hash_config.heads_per_layer
    expected = [("embed",), ("wait", 0), ("block", 0), ("block", 1), ("wait", 2), ("block", 2)]
    state, _ = prefill(model, x[:, :4])
    events.clear()
    step(model, state, x[:, 4:5])
    assert events == [("prefetch", 0, (2, 1, K)), ("prefetch", 2, (2, 1, K))] + expected, events
    events.clear()
    with torch.no_grad():
        model(x)
    assert events == [("prefetch", 0, (2, 6, K)), ("prefetch", 2, (2, 6, K))] + expected, events


def test_generate_matches_recomputing_forward(world):
    _, ckpt = world
    model = ckpt.model
    prompt = batches(model.config.vocab_size, n=1, B=2, T=4, seed=9)[0]
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (2, 16) and torch.equal(out[:, :4], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, prompt, 12, greedy=False, temperature=0.8, generator=g)
    again = generate(model, prompt, 12, greedy=False, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again) and sampled.shape == (2, 16)


def test_positions_past_max_seq_len_refused(world):
    _, ckpt = world
    model = ckpt.model
    L = model.config.max_seq_len
    x = batches(model.config.vocab_size, n=1, B=1, T=L)[0]
    state, _ = prefill(model, x)
    with pytest.raises(EngramStoreError, match="max_seq_len"):
        step(model, state, x[:, :1])
    assert state.pos == L  # the failed step changed nothing
    with pytest.raises(EngramStoreError, match="max_seq_len"):
        generate(model, x[:, :4], max_new_tokens=L - 2)
    assert generate(model, x[:, :4], max_new_tokens=L - 3).shape == (1, L + 1)
    with pytest.raises(EngramStoreError, match="sequences"):
        step(model, init_state(model, 2), x[:, :1])
