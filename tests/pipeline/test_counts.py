"""Counting at real size: uint32 counts, the in-place kernels, order(), the counts file, and counting
through our own and V4.1-style checkpoints, against independent references.

References: ``np.bincount`` / ``np.argsort`` on int64 copies, ``collections.Counter``, the npz bytes
decoded with ``zipfile`` from the .npy definition, and for V4.1 a plain loop over positions and heads
written from the hash definition in REAL_CHECKPOINTS.md (trial-division primes, the layer-seeded odd
multipliers, XOR of token * multiplier, modulo, head offsets), with the real V4 tokenizer.
"""

from __future__ import annotations

import ast
import collections
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_pipeline.counts as counts_mod
from engram_model.corpus import Skipped, iter_texts, read_corpus_text, stdlib_files
from engram_pipeline.counts import (
    FORMAT, MAX_COUNT, Counts, add_counts, add_rows, count_corpus, count_histogram, count_source, merge, merge_files,
)
from engram_store.errors import CountOverflowError, EngramStoreError, FingerprintMismatchError, StoreCorruptError

INT64_MAX = 2**63 - 1


# -- kernels and order -------------------------------------------------------------------

def test_add_rows_matches_bincount_and_refuses_to_wrap():
    rng = np.random.default_rng(0)
    total = np.zeros(1000, np.uint32)
    ref = np.zeros(1000, np.int64)
    for _ in range(5):
        rows = rng.integers(0, 1000, size=rng.integers(1, 5000))
        add_rows(total, rows)
        ref += np.bincount(rows, minlength=1000)
    assert total.dtype == np.uint32
    np.testing.assert_array_equal(total, ref)

    total[7] = MAX_COUNT - 1
    add_rows(total, np.array([7]))  # reaches the maximum exactly
    assert total[7] == MAX_COUNT
    with pytest.raises(CountOverflowError, match="row 7 .*4,294,967,295"):
        add_rows(total, np.array([3, 7]))
    assert total[7] == MAX_COUNT  # never wrapped
    with pytest.raises(EngramStoreError, match="outside table"):
        add_rows(total, np.array([1000]))


def test_add_counts_and_merge_refuse_to_wrap(tmp_path):
    a = np.array([1, MAX_COUNT - 5, 0], np.uint32)
    b = np.array([2, 5, 9], np.uint32)
    add_counts(a, b)
    np.testing.assert_array_equal(a, [3, MAX_COUNT, 9])
    with pytest.raises(CountOverflowError, match="row 1 "):
        add_counts(a, np.array([0, 1, 0], np.uint32))

    x = Counts("f" * 64, {"layer1": np.array([MAX_COUNT, 1], np.uint32)})
    y = Counts("f" * 64, {"layer1": np.array([1, 1], np.uint32)})
    with pytest.raises(CountOverflowError, match="merge fewer"):
        merge([x, y])
    assert x.tables["layer1"][0] == MAX_COUNT  # the inputs are left alone
    x.save(tmp_path / "x.npz")
    y.save(tmp_path / "y.npz")
    with pytest.raises(CountOverflowError):
        merge_files([tmp_path / "x.npz", tmp_path / "y.npz"])


def test_counts_are_uint32_and_bad_tables_are_refused():
    c = Counts("f" * 64, {"layer1": np.arange(5, dtype=np.int64)})
    assert c.tables["layer1"].dtype == np.uint32
    with pytest.raises(CountOverflowError, match="0..4,294,967,295"):
        Counts("f" * 64, {"layer1": np.array([-1, 2])})
    with pytest.raises(CountOverflowError):
        Counts("f" * 64, {"layer1": np.array([2**32])})
    with pytest.raises(EngramStoreError, match="1-D integer"):
        Counts("f" * 64, {"layer1": np.ones(3)})


@pytest.mark.parametrize("case", ["ties", "big", "zeros", "empty", "one"])
def test_order_is_a_stable_descending_sort(case):
    rng = np.random.default_rng(5)
    c = {
        "ties": rng.integers(0, 4, size=20000),  # mostly ties, many zeros
        "big": np.concatenate([rng.integers(0, 3, 5000), rng.integers(60000, 70000, 3000),
                               [MAX_COUNT, MAX_COUNT, 2**16, 2**16 - 1]]),
        "zeros": np.zeros(777, np.int64),
        "empty": np.zeros(0, np.int64),
        "one": np.array([5]),
    }[case]
    rng.shuffle(c)
    counts = Counts("f" * 64, {"layer1": c})
    order = counts.order("layer1")
    assert order.dtype == np.int32
    np.testing.assert_array_equal(order, np.argsort(-np.asarray(c, np.int64), kind="stable"))


def test_histogram_matches_a_counter():
    rng = np.random.default_rng(2)
    c = np.concatenate([rng.zipf(1.2, 50000) % 200000, [0] * 100, [MAX_COUNT]]).astype(np.uint32)
    values, rows = count_histogram(c)
    ref = collections.Counter(c.tolist())
    assert list(values) == sorted(ref, reverse=True)
    assert dict(zip(values.tolist(), rows.tolist())) == ref


# -- the counts file -----------------------------------------------------------------------

def _npy_payload(raw: bytes) -> tuple[dict, bytes]:
    """The header dict and data bytes of a .npy file, from its definition: magic, version, u16/u32 header
    length, a Python-literal dict, the raw data."""
    assert raw[:6] == b"\x93NUMPY"
    major = raw[6]
    n, start = (int.from_bytes(raw[8:10], "little"), 10) if major == 1 else (int.from_bytes(raw[8:12], "little"), 12)
    return ast.literal_eval(raw[start:start + n].decode("latin1")), raw[start + n:]


def test_counts_file_bytes(tmp_path):
    tables = {"layer1": np.array([0, 1, 2**31, MAX_COUNT], np.int64), "layer14": np.array([7, 0, 3], np.int64)}
    c = Counts("a" * 64, tables, {"seed": 0}, {"layer1": 256, "layer14": 256}, tokens=9, files=2,
               row_format="fp8_e4m3_ue8m0")
    c.save(tmp_path / "c.npz")
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert sorted(z.namelist()) == ["__meta__.npy", "layer1.npy", "layer14.npy"]
        for name, values in tables.items():
            header, data = _npy_payload(z.read(f"{name}.npy"))
            assert header["descr"] == "<u4" and header["shape"] == (len(values),)
            assert data == b"".join(int(v).to_bytes(4, "little") for v in values)
        _, meta_raw = _npy_payload(z.read("__meta__.npy"))
    meta = json.loads(meta_raw.decode("utf-32-le").rstrip("\0"))
    assert meta["format"] == FORMAT == "engram-counts/2"
    assert (meta["tokens"], meta["files"], meta["row_format"]) == (9, 2, "fp8_e4m3_ue8m0")
    back = Counts.load(tmp_path / "c.npz")
    assert back.row_format == "fp8_e4m3_ue8m0" and back.dims == c.dims
    for name, values in tables.items():
        assert back.tables[name].dtype == np.uint32
        np.testing.assert_array_equal(back.tables[name], values)


def _write_raw(path, meta: dict, **tables):
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)), **tables)


def test_old_unknown_or_mistyped_counts_files_are_refused(tmp_path):
    _write_raw(tmp_path / "old.npz", {"format": "engram-counts/1", "fingerprint": "f"}, layer1=np.arange(3))
    with pytest.raises(StoreCorruptError, match=r"engram-counts/1.*older.*count the corpus again"):
        Counts.load(tmp_path / "old.npz")
    _write_raw(tmp_path / "new.npz", {"format": "engram-counts/9", "fingerprint": "f"}, layer1=np.arange(3))
    with pytest.raises(StoreCorruptError, match="unknown"):
        Counts.load(tmp_path / "new.npz")
    _write_raw(tmp_path / "i64.npz", {"format": FORMAT, "fingerprint": "f"}, layer1=np.arange(3))
    with pytest.raises(StoreCorruptError, match="int64.*expected 1-D uint32"):
        Counts.load(tmp_path / "i64.npz")


def test_merge_files_equals_the_sum(tmp_path):
    rng = np.random.default_rng(3)
    parts = [Counts("f" * 64, {"layer1": rng.integers(0, 1000, 300), "layer2": rng.integers(0, 9, 50)},
                    tokens=10 + k, files=1) for k in range(3)]
    for k, p in enumerate(parts):
        p.save(tmp_path / f"{k}.npz")
    m = merge_files([tmp_path / f"{k}.npz" for k in range(3)])
    for name in ("layer1", "layer2"):
        ref = sum(p.tables[name].astype(np.int64) for p in parts)
        np.testing.assert_array_equal(m.tables[name], ref)
        assert m.tables[name].dtype == np.uint32
    assert (m.tokens, m.files) == (33, 3)
    Counts("e" * 64, {"layer1": np.zeros(300, np.uint32), "layer2": np.zeros(50, np.uint32)}).save(tmp_path / "other.npz")
    with pytest.raises(FingerprintMismatchError, match="count the corpus again"):
        merge_files([tmp_path / "0.npz", tmp_path / "other.npz"])


# -- corpus hygiene -----------------------------------------------------------------------

def test_binary_and_undecodable_files_are_skipped(tmp_path):
    (tmp_path / "good.py").write_text("print('hello')\n")
    shutil.copyfile("/bin/ls", tmp_path / "ls.txt")
    (tmp_path / "latin.md").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "late_nul.txt").write_bytes(b"x" * 9000 + b"\0")  # NUL past the sniffed window: valid UTF-8 text
    skipped: list[Skipped] = []
    texts = list(iter_texts([tmp_path], skipped))
    assert texts == [(tmp_path / "good.py").read_text(), "x" * 9000 + "\0"]
    assert [s.path.name for s in skipped] == ["latin.md", "ls.txt"]
    assert "not UTF-8 (byte 0xe9 at offset 3)" == skipped[0].reason and skipped[1].reason.startswith("binary")
    assert read_corpus_text(Path("/bin/ls"))[0] is None


# -- counting through checkpoints -------------------------------------------------------

def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _reference_v41_counts(text_config: dict, lookup: np.ndarray, token_lists) -> dict[str, collections.Counter]:
    """The row accesses of each token list, from the hash definition (REAL_CHECKPOINTS.md), by plain loops."""
    V, n, heads = text_config["engram_compressed_vocab_size"], text_config["engram_max_ngram_size"], \
        text_config["engram_n_heads"]
    pad = int(lookup[text_config["engram_pad_token_id"]])
    used, primes = set(), {}
    for layer in text_config["engram_layer_ids"]:
        primes[layer] = []
        for _order in range(2, n + 1):
            p = text_config["engram_vocab_size"] - 1
            for _ in range(heads):
                p += 1
                while p in used or not _is_prime(p):
                    p += 1
                used.add(p)
                primes[layer].append(p)
    out = {}
    for layer in text_config["engram_layer_ids"]:
        r = np.random.default_rng(0 + 10007 * layer).integers(0, (INT64_MAX // V) // 2, size=n, dtype=np.int64)
        mult = [int(2 * v + 1) for v in r]
        offsets = [sum(primes[layer][:k]) for k in range(len(primes[layer]))]
        counter = collections.Counter()
        for ids in token_lists:
            x = [int(lookup[i]) for i in ids]
            for t in range(len(x)):
                window = [x[t - k] if t - k >= 0 else pad for k in range(n)]
                mix = window[0] * mult[0]
                for order in range(2, n + 1):
                    mix ^= window[order - 1] * mult[order - 1]
                    for h in range(heads):
                        k = (order - 2) * heads + h
                        counter[offsets[k] + mix % primes[layer][k]] += 1
        out[f"layer{layer}"] = counter
    return out


def _small_stdlib_files(k=3, lo=3000, hi=9000) -> list[Path]:
    return [f for f in stdlib_files() if lo <= f.stat().st_size <= hi][:k]


def _as_dict(table: np.ndarray) -> dict[int, int]:
    nz = np.flatnonzero(table)
    return dict(zip(nz.tolist(), table[nz].tolist()))


@pytest.fixture(scope="module")
def v41_dir(tmp_path_factory) -> Path:
    from engram_pipeline.v41_checkpoint import write_v41_checkpoint

    path = tmp_path_factory.mktemp("v41count") / "ckpt"
    write_v41_checkpoint(path, engram_vocab_size=1000, layer_ids=(1, 14), progress=False)
    return path


def test_v41_counts_equal_the_hash_definition(v41_dir, tmp_path):
    from tokenizers import Tokenizer

    files = _small_stdlib_files()
    counts, report = count_corpus(v41_dir, files, workers=2, progress=False)
    tc = json.loads((v41_dir / "config.json").read_text())["text_config"]
    source = count_source(v41_dir)
    tok = Tokenizer.from_file(str(v41_dir / "tokenizer.json"))
    token_lists = [tok.encode(f.read_text()).ids for f in files]
    ref = _reference_v41_counts(tc, source.lookup, token_lists)
    assert sorted(counts.tables) == ["layer1", "layer14"]
    for (name, table), rows in zip(sorted(counts.tables.items()), tc["engram_num_embeddings"]):
        assert table.size == rows and table.dtype == np.uint32
        assert _as_dict(table) == dict(ref[name])
    tokens = sum(map(len, token_lists))
    assert report["tokens"] == counts.tokens == tokens and report["rows_counted"] == tokens * 24 * 2
    assert counts.row_format == "fp8_e4m3_ue8m0" and counts.dims == {"layer1": 256, "layer14": 256}

    # Only config.json and tokenizer.json: the same counts under the same fingerprint.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(v41_dir / name, bare / name)
    again, _ = count_corpus(bare, files, workers=1, progress=False)
    assert again.fingerprint == counts.fingerprint
    for name in counts.tables:
        np.testing.assert_array_equal(again.tables[name], counts.tables[name])


def test_v41_config_with_wrong_table_sizes_is_refused(v41_dir, tmp_path):
    from engram_store.errors import CheckpointError

    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = json.loads((v41_dir / "config.json").read_text())
    cfg["text_config"]["engram_num_embeddings"][0] += 1
    (bare / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(v41_dir / "tokenizer.json", bare / "tokenizer.json")
    with pytest.raises(CheckpointError, match="head primes"):
        count_source(bare)


def _own_checkpoint(path):
    from engram_model.bpe import train_bpe
    from engram_model.checkpoint import save_checkpoint
    from engram_model.compression import CompressedTokenizer
    from engram_model.model import EngramLM, ModelConfig

    docs = [f.read_text() for f in _small_stdlib_files(8)]
    tok = train_bpe(docs, vocab_size=400)
    comp = CompressedTokenizer.from_tokenizer(tok)
    cfg = ModelConfig(vocab_size=comp.vocab_size, d_model=16, n_layers=2, n_heads=2, max_seq_len=32,
                      engram_layers=(0, 1), engram_table_sizes=(300, 200), engram_heads=2, engram_head_dim=8)
    torch.manual_seed(0)
    save_checkpoint(path, EngramLM(cfg, comp).eval(), tok)
    return path


def test_own_checkpoint_counts_equal_a_counter_of_row_ids(tmp_path, monkeypatch):
    from engram_model.checkpoint import load_checkpoint

    ckpt = _own_checkpoint(tmp_path / "ckpt")
    files = _small_stdlib_files(4)
    counts, _ = count_corpus(ckpt, files, workers=2, progress=False)
    ck = load_checkpoint(ckpt)
    ref = {name: collections.Counter() for name in counts.tables}
    for f in files:
        comp = torch.as_tensor(ck.compression.compress(np.array(ck.tokenizer.encode(f.read_text()).ids)))[None]
        for layer, rows in ck.hasher.row_ids(comp).items():
            ref[f"layer{layer}"].update(rows.reshape(-1).tolist())
    for name, table in counts.tables.items():
        assert _as_dict(table) == dict(ref[name])
    assert counts.row_format == "float32"

    # Hashing in chunks (with the max_ngram - 1 tokens before each) gives the rows of the whole sequence.
    monkeypatch.setattr(counts_mod, "CHUNK_TOKENS", 7)
    counter = counts_mod._Counter(count_source(ckpt))
    totals = counter.zeros()
    for f in files:
        counter.count(f.read_text(), totals)
    for name in counts.tables:
        np.testing.assert_array_equal(totals[name], counts.tables[name])


def test_peak_rss_follows_the_formula(tmp_path):
    """Parent and worker RSS against the module docstring's formula, on tables of 2 x 24 M rows (4 B each):
    an int64 temporary of table size anywhere would show as 8 bytes per row more."""
    from engram_model.compression import v4_tokenizer_path
    from engram_pipeline.v41_checkpoint import v41_num_embeddings

    vocab = 1_000_000
    rows = v41_num_embeddings(vocab, (1, 14), 4, 8, 99092)
    tc = {"engram_layer_ids": [1, 14], "engram_max_ngram_size": 4, "engram_n_heads": 8, "engram_head_dim": 256,
          "engram_vocab_size": vocab, "engram_num_embeddings": rows, "engram_compressed_vocab_size": 99092,
          "engram_pad_token_id": 2}
    source = counts_mod.hf_config_source({"text_config": tc}, v4_tokenizer_path())
    files = _small_stdlib_files(6)
    _, base = count_corpus(source, files, workers=2, progress=False, hash_rows=False)
    counts, rep = count_corpus(source, files, workers=2, progress=False, scratch=tmp_path)
    table_bytes = 4 * sum(rows)
    slack = 64 << 20
    for worker, baseline in zip(sorted(rep["peak_rss"]["workers"]), sorted(base["peak_rss"]["workers"])):
        assert worker - baseline <= table_bytes + slack, (worker, baseline, table_bytes)
    grown = rep["peak_rss"]["parent"] - base["peak_rss"]["parent"]
    assert 0.9 * table_bytes <= grown <= table_bytes + slack, (grown, table_bytes)
    assert sum(int(t.sum(dtype=np.uint64)) for t in counts.tables.values()) == rep["rows_counted"]
    assert not list(tmp_path.iterdir())  # the scratch totals are gone
