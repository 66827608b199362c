"""Checkpoint save / load: round trip, tables, fingerprint check, bad directories."""

import json

import pytest
import torch

from engram_model.bpe import train_bpe
from engram_model.checkpoint import load_checkpoint, save_checkpoint
from engram_model.compression import CompressedTokenizer
from engram_model.hashing import fingerprint
from engram_model.model import EngramLM, ModelConfig
from engram_store.errors import FingerprintMismatchError, StoreCorruptError, StoreNotFoundError

TEXT = ["def add(a, b):\n    return a + b\n", "class Thing:\n    '''A Thing.'''\n    pass\n"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, vocab_size=300)


def tiny(tok, layers=(1,)):
    torch.manual_seed(0)
    comp = CompressedTokenizer.from_tokenizer(tok)
    cfg = ModelConfig(vocab_size=comp.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                      engram_layers=layers, engram_table_sizes=(50, 40), engram_heads=2, engram_head_dim=4)
    return EngramLM(cfg, comp)


def test_roundtrip(tmp_path, tok):
    model = tiny(tok).eval()
    save_checkpoint(tmp_path, model, tok, extra={"note": "hi"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    ck = load_checkpoint(tmp_path)
    assert not ck.model.training
    assert ck.fingerprint == model.fingerprint == fingerprint(ck.hash_config, ck.compression.lookup)
    assert ck.extra == {"note": "hi"}
    assert ck.hash_config == model.hash_config
    assert ck.hasher.table_rows == model.hasher.table_rows
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.testing.assert_close(ck.model(x), model(x), rtol=0, atol=0)
    tables = ck.engram_tables()
    assert list(tables) == ["layer1"]
    assert tables["layer1"].shape == (ck.hasher.table_rows[1], 4)
    torch.testing.assert_close(tables["layer1"], model.tables["layer1"].weight.detach())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["hash"]["layer_ids"] == [1]


def test_baseline_roundtrip(tmp_path, tok):
    model = tiny(tok, layers=()).eval()
    save_checkpoint(tmp_path, model, tok)
    ck = load_checkpoint(tmp_path)
    assert ck.fingerprint is None and ck.engram_tables() == {}
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    torch.testing.assert_close(ck.model(x), model(x))


def test_other_tokenizer_is_refused(tmp_path, tok):
    save_checkpoint(tmp_path, tiny(tok), tok)
    # same vocabulary size, two tokens' ids swapped: a subtly different tokenizer
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[100]], vocab[by_id[200]] = 200, 100
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        load_checkpoint(tmp_path)


def test_missing_and_corrupt(tmp_path, tok):
    with pytest.raises(StoreNotFoundError):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path, tiny(tok), tok)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(StoreCorruptError):
        load_checkpoint(tmp_path)
