"""Serving from the store: logits equal the in-memory model's, bit for bit.

Reference: the checkpoint's own model with its tables in memory (cast to the store's dtype
for float16 / bfloat16 stores). Every backend, every tier (all HBM, all DRAM, all disk, a
mix small enough to evict), several batches so later batches meet a cache the earlier ones
filled. Plus: the fingerprint check, and the read-only guarantee.
"""

from __future__ import annotations

import pytest
import torch

import engram_store
from engram_model.bpe import train_bpe
from engram_model.checkpoint import load_checkpoint, save_checkpoint
from engram_model.compression import CompressedTokenizer
from engram_model.model import EngramLM, ModelConfig
from engram_model.serving import ReadOnlyTableError, ServedTable, load_served, serve_from_store
from engram_store.errors import FingerprintMismatchError
from engram_store.format import DTYPES

DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n# note {i % 13} about f{i}\n" for i in range(200)]


def tiny_model(tok, seed: int = 0, max_seq_len: int = 24) -> EngramLM:
    """Engram at blocks 0 and 2 of 3, a short conv with non-zero weights (its state matters)."""
    torch.manual_seed(seed)
    comp = CompressedTokenizer.from_tokenizer(tok)
    cfg = ModelConfig(vocab_size=comp.vocab_size, d_model=32, n_layers=3, n_heads=2, max_seq_len=max_seq_len,
                      engram_layers=(0, 2), engram_table_sizes=(300, 200), engram_heads=2, engram_head_dim=8,
                      hash_seed=seed)
    model = EngramLM(cfg, comp)
    for e in model.engrams.values():
        torch.nn.init.normal_(e.short_conv.weight, std=0.5)
    return model.eval()


def tiny_checkpoint(path):
    """A tokenizer trained on DOCS and ``tiny_model`` saved with it at ``path``: (tokenizer, loaded checkpoint)."""
    tok = train_bpe(DOCS, vocab_size=300)
    save_checkpoint(path, tiny_model(tok), tok)
    return tok, load_checkpoint(path)


def build_store(ckpt, path, backend: str = "mmap", dtype: str = "float32", seed: int = 0):
    """The checkpoint's tables in a random rank order (so rank != row everywhere)."""
    g = torch.Generator().manual_seed(seed)
    tables = {n: t.to(DTYPES[dtype]) for n, t in ckpt.engram_tables().items()}
    order = {n: torch.randperm(t.shape[0], generator=g) for n, t in tables.items()}
    return engram_store.write(path, tables, order, backend=backend, fingerprint=ckpt.fingerprint)


def batches(vocab: int, n: int = 4, B: int = 3, T: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (B, T), generator=g) for _ in range(n)]


def table_bytes(ckpt, dtype: str = "float32") -> int:
    return sum(t.shape[0] * t.shape[1] * DTYPES[dtype].itemsize for t in ckpt.engram_tables().values())


def budgets(total: int) -> dict[str, tuple[int, int]]:
    """name -> (hbm_bytes, dram_bytes)."""
    return {"all-hbm": (total, 0), "all-dram": (0, total), "all-disk": (0, 0),
            "mixed": (total // 10, total // 8)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    tok, ckpt = tiny_checkpoint(root / "ckpt")
    stores = {}
    for backend in ("mmap", "lmdb"):
        for dtype in ("float32", "float16", "bfloat16"):
            stores[backend, dtype] = build_store(ckpt, root / f"store-{backend}-{dtype}", backend, dtype)
    return root, tok, ckpt, stores


def reference(ckpt_dir, dtype: str = "float32") -> EngramLM:
    """The in-memory model, its tables cast to ``dtype`` (the model itself stays float32)."""
    model = load_checkpoint(ckpt_dir).model
    for t in model.tables.values():
        t.weight.data = t.weight.data.to(DTYPES[dtype])
    return model


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("budget", ["all-hbm", "all-dram", "all-disk", "mixed"])
def test_float32_bit_exact(world, backend, budget):
    root, _, ckpt, stores = world
    hbm, dram = budgets(table_bytes(ckpt))[budget]
    ref = reference(root / "ckpt")
    model, store = load_served(root / "ckpt", stores[backend, "float32"], hbm_bytes=hbm, dram_bytes=dram,
                               backend=backend)
    with store, torch.no_grad():
        assert isinstance(model.memory()[0], ServedTable) and not model.tables
        for x in batches(model.config.vocab_size) * 2:  # the second round meets a warm cache
            got, want = model(x), ref(x)
            assert torch.equal(got, want), f"{backend}/{budget}: max abs diff {(got - want).abs().max().item():g}"
        stats = store.stats()
    for name in ("layer0", "layer2"):
        s = stats[name]
        assert s["prefetches"] == 8 and s["wait_ms"]["count"] == 8
        hits = {"hbm": s["hbm"]["hits"], "dram": s["dram"]["hits"], "disk": s["disk"]["rows"]}
        if budget == "all-hbm":
            assert hits["dram"] == hits["disk"] == 0 < hits["hbm"]
        elif budget == "all-dram":
            assert hits["hbm"] == hits["disk"] == 0 < hits["dram"]
        elif budget == "all-disk":
            assert hits["hbm"] == hits["dram"] == 0 < hits["disk"]
        else:  # every tier serves, and the DRAM tier had to evict
            assert min(hits.values()) > 0 and s["dram"]["evictions"] > 0, s


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_stores_equal_cast_model(world, backend, dtype):
    root, _, ckpt, stores = world
    total = table_bytes(ckpt, dtype)
    ref, ref32 = reference(root / "ckpt", dtype), reference(root / "ckpt")
    for hbm, dram in [(0, 0), (total // 10, total // 8)]:
        model, store = load_served(root / "ckpt", stores[backend, dtype], hbm_bytes=hbm, dram_bytes=dram)
        with store, torch.no_grad():
            assert model.memory()[2].dtype == DTYPES[dtype]
            for x in batches(model.config.vocab_size, n=3):
                got = model(x)
                assert got.dtype == torch.float32
                assert torch.equal(got, ref(x)), f"max abs diff {(got - ref(x)).abs().max().item():g}"
                assert not torch.equal(got, ref32(x))  # the cast is real: the float32 model differs


def test_async_issue_bit_exact(world):
    """Prefetches issued from the background thread: same logits, in issue order, errors at wait()."""
    root, _, ckpt, stores = world
    total = table_bytes(ckpt)
    ref = reference(root / "ckpt")
    model, store = load_served(root / "ckpt", stores["mmap", "float32"], hbm_bytes=total // 10,
                               dram_bytes=total // 8, async_issue=True)
    with store, torch.no_grad():
        assert model.memory()[0].issuer is not None
        for x in batches(model.config.vocab_size, n=3) * 2:
            assert torch.equal(model(x), ref(x))
        assert store.stats()["layer0"]["dram"]["evictions"] > 0
        timer = model.serving_timer.summary()
        assert timer["prefetches"] == timer["waits"] == 12 and timer["fetch_s"] > 0
        pending = model.memory()[0].prefetch(torch.tensor([model.memory()[0].rows]))
        with pytest.raises(engram_store.InvalidRowIdsError):
            pending.wait()


def test_fingerprint_mismatch_refused(world, tmp_path):
    root, tok, ckpt, stores = world
    other = tiny_model(tok, seed=7)  # another hash seed: another fingerprint, same table shapes
    save_checkpoint(tmp_path / "other", other, tok)
    other_ck = load_checkpoint(tmp_path / "other")
    assert other_ck.fingerprint != ckpt.fingerprint
    with pytest.raises(FingerprintMismatchError, match="fingerprint.*rebuild the store") as err:
        load_served(tmp_path / "other", stores["mmap", "float32"])
    assert "cannot be served from this store" in str(err.value) and ckpt.fingerprint in str(err.value)
    # a store written without a fingerprint is refused too
    engram_store.write(tmp_path / "nofp", ckpt.engram_tables(), backend="mmap")
    with pytest.raises(FingerprintMismatchError):
        load_served(root / "ckpt", tmp_path / "nofp")
    # and plugging an open store into the wrong model directly
    with engram_store.open(stores["mmap", "float32"], device="cpu") as store:
        with pytest.raises(FingerprintMismatchError, match="rebuild the store"):
            serve_from_store(other_ck.model, store)


def test_served_tables_are_read_only(world):
    root, _, ckpt, stores = world
    model, store = load_served(root / "ckpt", stores["lmdb", "float32"], dram_bytes=1 << 20)
    with store:
        ids = torch.tensor([[1, 2], [3, 4]])
        before = store.lookup("layer0", ids)
        for table in model.memory().values():
            with pytest.raises(ReadOnlyTableError, match="read-only"):
                table.update(ids, torch.zeros(2, 2, table.dim))
        assert torch.equal(store.lookup("layer0", ids), before)
        assert not any(k.startswith("tables.") for k in model.state_dict())
        assert torch.equal(model.memory()[0].lookup(ids), ckpt.engram_tables()["layer0"][ids])
