"""The engine's call (engram_model.engine): V4.1-format tables imported into a store, fetched for real
text through the real V4 tokenizer, dead positions included, against the checkpoint's own bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import engram_store
from engram_model.corpus import read_text, stdlib_files
from engram_model.engine import EngramFetcher
from engram_model.hashing import DEAD
from engram_pipeline.counts import Counts
from engram_pipeline.hf_checkpoint import open_hf_checkpoint
from engram_pipeline.import_hf import import_hf_checkpoint
from engram_model.compression import v4_tokenizer_path as tokenizer_path
from engram_pipeline.v41_checkpoint import expected_rows, write_v41_checkpoint
from engram_store.errors import EngramStoreError, FingerprintMismatchError

VOCAB = 1500  # engram_vocab_size: 24 heads x ~1.5k rows per layer


@pytest.fixture(scope="module")
def v41(tmp_path_factory):
    root = tmp_path_factory.mktemp("v41")
    ckpt_dir = root / "ckpt"
    write_v41_checkpoint(ckpt_dir, engram_vocab_size=VOCAB, progress=False)
    with open_hf_checkpoint(ckpt_dir) as ck:
        rng = np.random.default_rng(0)
        # Zipf-like counts so the rank order is far from the identity (and has ties)
        tables = {n: rng.zipf(1.3, t.rows).clip(0, 10_000).astype(np.uint32) for n, t in ck.tables.items()}
        counts = Counts(ck.fingerprint, tables, ck.hash_config.to_dict(), {n: 264 for n in tables}, 1, 1)
        hc, comp = ck.hash_config, ck.compression
    stores = {}
    for backend in ("mmap", "lmdb"):
        # small buckets: the two-pass permutation runs with many buckets
        stores[backend] = import_hf_checkpoint(ckpt_dir, root / f"store-{backend}", counts=counts, backend=backend,
                                               bucket_bytes=64 << 10, chunk_rows=5000, progress=False)
    tok = __import__("tokenizers").Tokenizer.from_file(str(tokenizer_path()))
    text = read_text(next(f for f in stdlib_files() if f.name == "textwrap.py"))
    ids = torch.tensor(tok.encode(text).ids[:4 * 96]).reshape(4, 96)
    ids[0, :5] = DEAD  # a dead span at the start, in the middle and at the end
    ids[1, 40:47] = DEAD
    ids[2, -3:] = DEAD
    ids[3, 10] = DEAD
    return ckpt_dir, (hc, comp), stores, ids


def reference_rows(ckpt_dir, fetch: EngramFetcher, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Packed truth per layer [B, T, K, 264], zeros at dead positions (the row ids from the hasher, which
    tests/model/test_v41_hash.py holds to a plain-loop reference)."""
    rows, live = fetch.hasher.row_ids_live(fetch.compression.compress(ids, dead_ok=True))
    out = {}
    for L, r in rows.items():
        want = torch.zeros(*r.shape, 264, dtype=torch.uint8)
        want[live] = expected_rows(ckpt_dir, f"layer{L}", r[live])
        out[L] = want
    return out


BUDGETS = {"all-disk": (0, 0), "dram-half": (0, 10 << 20), "hbm-and-dram": (4 << 20, 8 << 20)}


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_packed_and_dequantized_rows_equal_the_checkpoint(v41, backend, budget, fp8_reference):
    ckpt_dir, (hc, comp), stores, ids = v41
    hbm, dram = BUDGETS[budget]
    with engram_store.open(stores[backend], device="cpu", hbm_bytes=hbm, dram_bytes=dram) as store:
        packed = EngramFetcher(store, hc, comp, dequantize=False)
        values = EngramFetcher(store, hc, comp)
        want = reference_rows(ckpt_dir, packed, ids)
        for _ in range(2):  # second round: rows now resident in the tiers
            got_p, got_v = packed.prefetch(ids), values.prefetch(ids)
            for L, w in want.items():
                p = got_p.wait(L)
                assert p.dtype == torch.uint8 and p.shape == (4, 96, 24, 264)
                assert torch.equal(p, w)
                v = got_v.wait(L)
                assert v.dtype == torch.bfloat16 and v.shape == (4, 96, 24, 256)
                ref = fp8_reference(w)  # independent decoding, bit for bit (dead positions: zero rows decode to 0)
                live = (ids != DEAD)
                assert torch.equal(v[live].view(torch.int16), ref[live].view(torch.int16))
                assert not v[~live].any()


def test_context_continues_the_sequence(v41):
    ckpt_dir, (hc, comp), stores, ids = v41
    with engram_store.open(stores["mmap"], device="cpu", dram_bytes=4 << 20) as store:
        f = EngramFetcher(store, hc, comp, dequantize=False)
        whole = f.prefetch(ids)
        first = f.prefetch(ids[:, :50])
        rest = f.prefetch(ids[:, 50:], context=ids[:, 47:50])
        for L in f.hash_config.layer_ids:
            joined = torch.cat([first.wait(L), rest.wait(L)], dim=1)
            assert torch.equal(joined, whole.wait(L))


def test_row_id_variant_equals_token_variant(v41):
    ckpt_dir, (hc, comp), stores, ids = v41
    with engram_store.open(stores["lmdb"], device="cpu") as store:
        f = EngramFetcher(store, hc, comp, dequantize=False)
        rows, live = f.hasher.row_ids_live(f.compression.compress(ids, dead_ok=True))
        a, b = f.prefetch(ids), f.prefetch_rows(rows, live)
        for L in f.hash_config.layer_ids:
            assert torch.equal(a.wait(L), b.wait(L))
        with pytest.raises(EngramStoreError, match="Engram layers"):
            f.prefetch_rows({99: rows[next(iter(rows))]})


class TinyEngramLayer(nn.Module):
    """A gated Engram read as an engine would wire it: rows [B, T, K, D] -> a residual update."""

    def __init__(self, d_model: int, k: int, d: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.value = nn.Parameter(torch.randn(k * d, d_model, generator=g) * 0.01)
        self.gate = nn.Parameter(torch.randn(d_model, 1, generator=g))

    def forward(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # the generated rows are random codes (NaN, huge scales): a real checkpoint's are finite
        v = rows.float().nan_to_num(0.0, 0.0, 0.0).clamp(-1e3, 1e3).flatten(-2) @ self.value  # (B, T, d_model)
        return h + torch.sigmoid(h @ self.gate) * v


def test_wired_into_a_small_model(v41, fp8_reference):
    ckpt_dir, _hc, stores, ids = v41
    with engram_store.open(stores["mmap"], device="cpu", dram_bytes=6 << 20) as store:
        fetch = EngramFetcher.from_checkpoint_dir(store, ckpt_dir)
        layers = {L: TinyEngramLayer(32, 24, 256) for L in fetch.hash_config.layer_ids}
        h0 = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(2))
        pending = fetch.prefetch(ids)  # at forward entry, before any block
        h = h0
        for L in sorted(layers):
            h = torch.tanh(h)  # "earlier layers compute"
            h = layers[L](h, pending.wait(L))
        ref_rows = reference_rows(ckpt_dir, fetch, ids)
        r = h0
        for L in sorted(layers):
            r = torch.tanh(r)
            r = layers[L](r, fp8_reference(ref_rows[L]))
        assert torch.isfinite(h).all() and torch.equal(h, r)


def test_store_of_another_checkpoint_is_refused(v41, tmp_path):
    ckpt_dir, _hc, stores, _ids = v41
    other = tmp_path / "other"
    write_v41_checkpoint(other, engram_vocab_size=VOCAB + 400, progress=False)
    with engram_store.open(stores["mmap"], device="cpu") as store:
        with pytest.raises(FingerprintMismatchError):
            EngramFetcher.from_checkpoint_dir(store, other)
