"""The Engram module against a dense re-computation, and EngramLM's memory-table protocol."""

import math

import pytest
import torch
import torch.nn as nn

from engram_model.bpe import train_bpe
from engram_model.compression import CompressedTokenizer
from engram_model.engram import Engram, ShortConv
from engram_model.memory import MemoryTable, ParamMemoryTable, Pending
from engram_store.prefetch.handle import Ready
from engram_model.model import EngramLM, ModelConfig
from engram_store.errors import EngramStoreError, InvalidRowIdsError


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def dense_engram(mod: Engram, hidden, emb):
    """Plain re-computation: loops over branches, positions and taps."""
    B, T, M, D = hidden.shape
    e = emb.flatten(-2)
    v = e @ mod.value_proj.weight.T + mod.value_proj.bias
    feps = torch.finfo(hidden.dtype).eps
    value = torch.zeros(B, T, M, D, dtype=hidden.dtype)
    for m in range(M):
        k = e @ mod.key_projs[m].weight.T + mod.key_projs[m].bias
        nk = rms(k, mod.key_norms[m].weight, feps)
        nq = rms(hidden[:, :, m], mod.query_norms[m].weight, feps)
        s = (nk * nq).sum(-1) / math.sqrt(D)
        g = torch.sigmoid(torch.sign(s) * torch.sqrt(torch.clamp(s.abs(), min=1e-6)))
        value[:, :, m] = g.unsqueeze(-1) * v
    conv = mod.short_conv
    normed = torch.stack([rms(value[:, :, m], conv.norms[m].weight, 1e-5) for m in range(M)], dim=2)
    flat = normed.reshape(B, T, M * D)
    w = conv.weight[:, 0, :]  # (M*D, K)
    K, dil = w.shape[1], conv.dilation
    y = torch.zeros_like(flat)
    for t in range(T):
        for j in range(K):
            src = t - (K - 1 - j) * dil
            if src >= 0:
                y[:, t] += w[:, j] * flat[:, src]
    y = torch.nn.functional.silu(y).reshape(B, T, M, D)
    return value + y


@pytest.mark.parametrize("M", [1, 3])
def test_engram_matches_dense(M):
    torch.manual_seed(0)
    mod = Engram(d_model=8, n_heads=4, head_dim=3, hc_mult=M, kernel_size=4, max_ngram=3)
    with torch.no_grad():
        mod.short_conv.weight.normal_()
        for n in list(mod.key_norms) + list(mod.query_norms) + list(mod.short_conv.norms):
            n.weight.uniform_(0.5, 1.5)
    hidden = torch.randn(2, 13, M, 8)
    emb = torch.randn(2, 13, 4, 3)
    torch.testing.assert_close(mod(hidden, emb), dense_engram(mod, hidden, emb), rtol=1e-5, atol=1e-5)


def test_conv_layout_matches_reference_conv1d():
    """Same result as the reference's nn.Conv1d(groups=M*D, padding both sides, truncated to T)."""
    torch.manual_seed(1)
    M, D, K, dil = 2, 5, 4, 3
    sc = ShortConv(D, hc_mult=M, kernel_size=K, dilation=dil, zero_init=False)
    ref = nn.Conv1d(M * D, M * D, K, groups=M * D, bias=False, padding=(K - 1) * dil, dilation=dil)
    ref.weight.data.copy_(sc.weight.data)
    x = torch.randn(2, 17, M, D)
    normed = torch.cat([sc.norms[m](x[:, :, m]) for m in range(M)], dim=-1).transpose(1, 2)
    expected = torch.nn.functional.silu(ref(normed)[..., :17]).transpose(1, 2).reshape(2, 17, M, D)
    torch.testing.assert_close(sc(x), expected)


def test_zero_initialized_conv_and_causality():
    torch.manual_seed(2)
    mod = Engram(d_model=8, n_heads=2, head_dim=4)
    assert torch.count_nonzero(mod.short_conv.weight) == 0
    hidden, emb = torch.randn(1, 10, 1, 8), torch.randn(1, 10, 2, 4)
    gate = mod.gates(hidden, emb.flatten(-2))
    torch.testing.assert_close(mod(hidden, emb), gate * mod.value_proj(emb.flatten(-2)).unsqueeze(2))
    with torch.no_grad():
        mod.short_conv.weight.normal_()
    out = mod(hidden, emb)
    hidden2, emb2 = hidden.clone(), emb.clone()
    hidden2[:, 6:] += 1.0
    emb2[:, 6:] -= 1.0
    torch.testing.assert_close(mod(hidden2, emb2)[:, :6], out[:, :6])  # the future does not leak


# ---- EngramLM and the memory-table protocol ----------------------------------------------------
@pytest.fixture(scope="module")
def comp_and_cfg():
    tok = train_bpe(["def add(a, b):\n    return a + b\n", "The Quick brown fox.\n"] * 20, vocab_size=300)
    comp = CompressedTokenizer.from_tokenizer(tok)
    cfg = ModelConfig(vocab_size=comp.vocab_size, d_model=16, n_layers=3, n_heads=2, max_seq_len=12,
                      engram_layers=(1, 2), engram_table_sizes=(31, 29), engram_heads=2, engram_head_dim=4)
    return comp, cfg


class RecordingTable:
    """A store-like MemoryTable (not an nn.Module) that logs calls."""

    def __init__(self, weight, name, log):
        self.weight, self.name, self.log = weight.detach().clone(), name, log
        self.rows, self.dim = weight.shape

    def prefetch(self, row_ids):
        self.log.append(("prefetch", self.name))
        log, name, w = self.log, self.name, self.weight

        class P:
            def done(self):
                return True

            def wait(self):
                log.append(("wait", name))
                return w[row_ids]
        return P()


def test_prefetch_all_layers_before_first_block_wait_at_layer(comp_and_cfg):
    comp, cfg = comp_and_cfg
    torch.manual_seed(0)
    model = EngramLM(cfg, comp).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    expected = model(x)
    log = []
    model.set_memory({L: RecordingTable(model.tables[f"layer{L}"].weight, L, log) for L in (1, 2)})
    assert "layer1" not in model.tables  # the parameter is dropped
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: log.append(("block", i)))
    out = model(x)
    assert log == [("prefetch", 1), ("prefetch", 2), ("block", 0), ("wait", 1), ("block", 1),
                   ("wait", 2), ("block", 2)]
    torch.testing.assert_close(out, expected)


def test_memory_protocol_and_errors(comp_and_cfg):
    comp, cfg = comp_and_cfg
    model = EngramLM(cfg, comp)
    t = model.tables["layer1"]
    assert isinstance(t, MemoryTable) and isinstance(t.prefetch(torch.tensor([0])), Pending)
    assert t.rows == model.hasher.table_rows[1] and t.dim == 4
    with pytest.raises(InvalidRowIdsError):
        t.prefetch(torch.tensor([t.rows]))
    with pytest.raises(EngramStoreError, match="shape"):
        model.set_memory({1: ParamMemoryTable(t.rows + 1, 4)})
    with pytest.raises(EngramStoreError, match="no Engram"):
        model.set_memory({0: t})
    with pytest.raises(InvalidRowIdsError, match="vocabulary"):
        model(torch.tensor([[0, cfg.vocab_size]]))
    with pytest.raises(InvalidRowIdsError):
        model(torch.tensor([[-1, 2]]))


def test_gradients_reach_only_looked_up_rows(comp_and_cfg):
    comp, cfg = comp_and_cfg
    model = EngramLM(cfg, comp)
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    model(x).sum().backward()
    rows = model.hasher.row_ids(comp.compress(x))[1].flatten().unique()
    grad = model.tables["layer1"].weight.grad
    touched = grad.abs().sum(-1).nonzero().flatten()
    assert set(touched.tolist()) <= set(rows.tolist()) and len(touched) > 0


def test_baseline_has_same_backbone_init(comp_and_cfg):
    comp, cfg = comp_and_cfg
    torch.manual_seed(5)
    a = EngramLM(cfg, comp)
    torch.manual_seed(5)
    b = EngramLM(cfg.baseline())
    sb = b.state_dict()
    for k, v in sb.items():
        torch.testing.assert_close(a.state_dict()[k], v)
    assert not b.tables and b.fingerprint is None


def test_ready_pending():
    p = Ready(fn=lambda: torch.ones(2))
    assert p.done() and torch.equal(p.wait(), torch.ones(2)) and p.wait() is p.wait()
