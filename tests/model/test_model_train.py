"""Training: determinism, checkpoint contents, reuse, bad corpora, the CLI; the real run is slow."""

import gzip
import json
import random

import pytest
import torch

from engram_model.checkpoint import load_checkpoint
from engram_model.corpus import iter_texts, split_files, stdlib_files
from engram_model.train import train, train_or_reuse
from engram_store.errors import EngramStoreError, StoreNotFoundError
from engram_store_cli.cli import main as cli_main

TINY = dict(vocab_size=300, seq_len=32, batch_size=4, eval_windows=8, warmup_steps=2,
            model=dict(d_model=32, n_layers=2, n_heads=2, engram_layers=(1,), engram_table_sizes=(101, 103),
                       engram_heads=2, engram_head_dim=4))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "def class return self value import the quick brown fox jumps over lazy dog".split()
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(40))
        if i % 4 == 0:
            with gzip.open(root / f"doc{i}.txt.gz", "wt") as f:
                f.write(text)
        else:
            (root / f"doc{i}.py").write_text(text)
    return root


def test_train_is_deterministic_and_saves_checkpoint(tmp_path, corpus):
    a = train([corpus], tmp_path / "a", steps=6, seed=3, progress=False, **TINY)
    b = train([corpus], tmp_path / "b", steps=6, seed=3, progress=False, **TINY)
    assert a["held_out_loss"] == b["held_out_loss"]
    assert a["baseline_held_out_loss"] == b["baseline_held_out_loss"]
    assert a["corpus"]["split"] == "by-file" and a["corpus"]["held_out_files"] > 0
    ck = load_checkpoint(tmp_path / "a")
    assert ck.extra["train"]["baseline_held_out_loss"] == a["baseline_held_out_loss"]
    assert ck.fingerprint == ck.model.fingerprint
    assert list(ck.engram_tables()) == ["layer1"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    c = train([corpus], None, steps=6, seed=4, progress=False, **TINY)
    assert c["held_out_loss"] != a["held_out_loss"]


def test_train_or_reuse(tmp_path, corpus):
    first = train_or_reuse(tmp_path, [corpus], steps=3, progress=False, **TINY)
    assert first["reused"] is False
    again = train_or_reuse(tmp_path, [corpus], steps=3, progress=False, **TINY)
    assert again["reused"] is True and again["held_out_loss"] == first["held_out_loss"]
    other = train_or_reuse(tmp_path, [corpus], steps=4, progress=False, **TINY)
    assert other["reused"] is False and other["steps"] == 4


def test_empty_and_missing_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngramStoreError, match="empty"):
        train([tmp_path / "empty"], None, steps=1, progress=False, **TINY)
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(EngramStoreError, match="empty"):
        train([tmp_path / "blank.txt"], None, steps=1, progress=False, **TINY)
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        train([tmp_path / "missing"], None, steps=1, progress=False, **TINY)
    (tmp_path / "tiny.txt").write_text("hello world")
    with pytest.raises(EngramStoreError, match="too small"):
        train([tmp_path / "tiny.txt"], None, steps=1, progress=False, **TINY)


def test_corpus_helpers(tmp_path, corpus):
    files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and len(files) > 100
    assert all(p.suffix == ".py" for p in files[:50])
    tr, ho = split_files(files, 0.1)
    assert (tr, ho) == split_files(files, 0.1) and 0 < len(ho) < len(files) // 5
    texts = list(iter_texts([corpus]))
    assert len(texts) == 12 and all(t.strip() for t in texts)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(EngramStoreError, match="bad.gz"):
        list(iter_texts([bad]))


def test_cli_train(tmp_path, corpus, capsys, monkeypatch):
    import engram_model.train as tr

    monkeypatch.setattr(tr, "DEFAULT_MODEL", {**tr.DEFAULT_MODEL, **TINY["model"]})
    rc = cli_main(["train", "--out", str(tmp_path / "ck"), "--corpus", str(corpus), "--steps", "2",
                   "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--quiet", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and out["held_out_loss"] > 0 and out["baseline_held_out_loss"] > 0
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    rc = cli_main(["train", "--out", str(tmp_path / "x"), "--corpus", str(tmp_path / "nope"), "--quiet"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_stdlib_training_engram_beats_baseline(tmp_path):
    """The real run (~4 minutes on 2 cores): held-out loss with Engram below the baseline."""
    torch.manual_seed(0)
    r = train(None, tmp_path, progress=False)
    print(json.dumps({k: r[k] for k in ("steps", "held_out_loss", "baseline_held_out_loss", "compression_ratio")}))
    assert r["held_out_loss"] < r["baseline_held_out_loss"]


def test_minutes_budget_calibrates_and_records_steps(corpus):
    r = train([corpus], None, minutes=0.05, progress=False, **TINY)
    assert r["steps"] >= 1 and r["settings"]["steps"] == r["steps"]
    with pytest.raises(EngramStoreError, match="not both"):
        train([corpus], None, minutes=1, steps=1, progress=False, **TINY)
