"""The command line on a V4.1-format Hugging Face checkpoint: count -> plan -> build -> verify -> inspect,
and each bad checkpoint a one-line error (exit 2) with nothing written."""

from __future__ import annotations

import json
import re
import shutil
import struct

import numpy as np
import pytest
import torch

import engram_store
from engram_model.corpus import stdlib_files
from engram_pipeline.counts import Counts
from engram_pipeline.v41_checkpoint import expected_rows, write_v41_checkpoint
from engram_store_cli.cli import main

VOCAB = 1200


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("v41cli")
    ckpt = root / "ckpt"
    write_v41_checkpoint(ckpt, engram_vocab_size=VOCAB, progress=False)
    corpus = root / "corpus"
    corpus.mkdir()
    for f in [f for f in stdlib_files() if f.name in ("textwrap.py", "colorsys.py", "bisect.py")]:
        shutil.copy(f, corpus / f.name)
    counts = root / "counts.npz"
    assert main(["count", "--checkpoint", str(ckpt), str(corpus), "-o", str(counts), "--no-progress"]) == 0
    return root, ckpt, corpus, counts


def test_count_plan_build_verify_inspect(world, tmp_path, capsys):
    root, ckpt, _corpus, counts_path = world
    counts = Counts.load(counts_path)
    assert sorted(counts.tables) == ["layer1", "layer14"] and counts.tokens > 0
    for name, c in counts.tables.items():
        assert int(c.sum()) == 24 * counts.tokens  # 3 orders x 8 heads per token
    assert main(["plan", str(counts_path), "--dram", "8MiB", "--dtype", "fp8_e4m3_ue8m0",
                 "--png", str(tmp_path / "plan.png")]) == 0
    out = tmp_path / "store"
    assert main(["build", "--checkpoint", str(ckpt), "--counts", str(counts_path), "--dram", "8MiB",
                 "-o", str(out), "--no-progress"]) == 0
    assert main(["verify", str(out), "--no-progress"]) == 0
    assert main(["inspect", str(out)]) == 0
    capsys.readouterr()
    with engram_store.open(out, device="cpu", dram_bytes=8 << 20) as s:
        for name in ("layer1", "layer14"):
            info = s.tables[name]
            assert info.row_format == "fp8_e4m3_ue8m0" and info.dim == 264
            ids = torch.arange(info.rows)
            assert torch.equal(s.lookup(name, ids, dequantize=False), expected_rows(ckpt, name, ids))
            # frequency-rank order: the most counted row is rank 0
            top = int(np.argmax(counts.tables[name]))
            assert int(s.remap(name)[top]) == 0


def test_build_without_counts_keeps_checkpoint_order(world, tmp_path):
    _root, ckpt, _corpus, _counts = world
    out = tmp_path / "store"
    assert main(["build", "--checkpoint", str(ckpt), "-o", str(out), "--backend", "lmdb", "--no-progress"]) == 0
    with engram_store.open(out, device="cpu") as s:
        remap = s.remap("layer14")
        assert np.array_equal(remap, np.arange(remap.size))
        ids = torch.randint(0, remap.size, (5000,), generator=torch.Generator().manual_seed(0))
        assert torch.equal(s.lookup("layer14", ids, dequantize=False), expected_rows(ckpt, "layer14", ids))


def _shard_of(ckpt, tensor: str):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / index["weight_map"][tensor]


def _rewrite_header(path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _edit_json(path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _truncate(ckpt):
    p = _shard_of(ckpt, "layers.14.engram.embed.weight")
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1000)


def _vocab(ckpt):
    _edit_json(ckpt / "config.json", lambda c: c["text_config"].update(engram_compressed_vocab_size=99_000))


def _primes(ckpt):
    _edit_json(ckpt / "config.json",
               lambda c: c["text_config"].update(engram_num_embeddings=[n + 2 for n in c["text_config"]
                                                                         ["engram_num_embeddings"]]))


def _missing(ckpt):
    _edit_json(ckpt / "model.safetensors.index.json", lambda i: i["weight_map"].pop("layers.1.engram.embed.scale"))


def _dtype(ckpt):
    _rewrite_header(_shard_of(ckpt, "layers.1.engram.embed.weight"),
                    lambda h: h["layers.1.engram.embed.weight"].update(dtype="BF16"))


def _shape(ckpt):
    def edit(h):
        t = h["layers.14.engram.embed.scale"]
        t["shape"] = [t["shape"][0], 16]
    _rewrite_header(_shard_of(ckpt, "layers.14.engram.embed.scale"), edit)


BAD = {"truncated shard": (_truncate, "shorter|truncat"), "compressed vocab": (_vocab, "99000|99,000|compress"),
       "prime sums": (_primes, "engram_num_embeddings"), "missing tensor": (_missing, "layers.1.engram.embed.scale"),
       "wrong dtype": (_dtype, "dtype|BF16"), "wrong shape": (_shape, "shape")}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["count", "build"])
def test_bad_checkpoint_is_one_line_exit_2_and_nothing_written(world, tmp_path, capsys, case, command):
    root, ckpt, corpus, counts = world
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    corrupt, pattern = BAD[case]
    corrupt(bad)
    out = tmp_path / "out" / ("c.npz" if command == "count" else "store")
    argv = (["count", "--checkpoint", str(bad), str(corpus), "-o", str(out), "--no-progress"] if command == "count"
            else ["build", "--checkpoint", str(bad), "--counts", str(counts), "-o", str(out), "--no-progress"])
    capsys.readouterr()
    assert main(argv) == 2  # count validates the whole checkpoint too: its counts are for these tables
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"engram-store {command}: error:")
    assert re.search(pattern, err, re.I), err
    assert not out.exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert not leftovers, f"half-written files left behind: {leftovers}"
