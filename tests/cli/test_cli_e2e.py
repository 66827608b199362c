"""The command line end to end on data the test makes: count -> plan -> build -> verify -> convert back."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engram_model.bpe import train_bpe
from engram_model.checkpoint import load_checkpoint, save_checkpoint
from engram_model.compression import CompressedTokenizer
from engram_model.model import EngramLM, ModelConfig
from engram_pipeline.counts import Counts
from engram_store_cli.cli import main

DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n# note {i % 13} about f{i}\n" for i in range(300)]


def _checkpoint(path, seed=0, table_sizes=(300, 200)):
    tok = train_bpe(DOCS, vocab_size=300)
    torch.manual_seed(seed)
    comp = CompressedTokenizer.from_tokenizer(tok)
    cfg = ModelConfig(vocab_size=comp.vocab_size, d_model=32, n_layers=3, n_heads=2, max_seq_len=32,
                      engram_layers=(0, 2), engram_table_sizes=table_sizes, engram_heads=2, engram_head_dim=8,
                      hash_seed=seed)
    save_checkpoint(path, EngramLM(cfg, comp).eval(), tok)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = _checkpoint(root / "ckpt")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(0, 200, 20):
        (corpus / f"part{i}.py").write_text("".join(DOCS[i:i + 20]))
    with gzip.open(corpus / "zipped.txt.gz", "wt") as f:
        f.write("".join(DOCS[200:240]))
    counts = root / "counts.npz"
    assert main(["count", "--checkpoint", str(ckpt), str(corpus), "-o", str(counts), "--no-progress"]) == 0
    return root, ckpt, corpus, counts


def _reference_counts(ckpt_dir, texts):
    """Straightforward re-computation: encode, compress, hash each text, count with a dict."""
    ck = load_checkpoint(ckpt_dir)
    ref = {f"layer{L}": {} for L in ck.hash_config.layer_ids}
    for text in texts:
        ids = torch.tensor(ck.tokenizer.encode(text).ids)
        comp = torch.as_tensor(ck.compression.compress(ids))[None]
        for L, rows in ck.hasher.row_ids(comp).items():
            for r in rows.reshape(-1).tolist():
                ref[f"layer{L}"][r] = ref[f"layer{L}"].get(r, 0) + 1
    return ref


def test_count_is_exact_and_merges(world, tmp_path):
    root, ckpt, corpus, counts_path = world
    counts = Counts.load(counts_path)
    texts = [p.read_text() for p in sorted(corpus.glob("*.py"))] + ["".join(DOCS[200:240])]
    ref = _reference_counts(ckpt, texts)
    for name, table in counts.tables.items():
        nz = np.flatnonzero(table)
        assert dict(zip(nz.tolist(), table[nz].tolist())) == ref[name]
    # Counting two halves apart and merging gives the same counts.
    files = sorted(corpus.glob("*"))
    a, b, m = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "m.npz"
    assert main(["count", "--checkpoint", str(ckpt), *map(str, files[:4]), "-o", str(a), "--no-progress", "--workers", "1"]) == 0
    assert main(["count", "--checkpoint", str(ckpt), *map(str, files[4:]), "-o", str(b), "--no-progress"]) == 0
    assert main(["count", "--merge", str(a), str(b), "-o", str(m)]) == 0
    merged = Counts.load(m)
    for name in counts.tables:
        np.testing.assert_array_equal(merged.tables[name], counts.tables[name])


@pytest.mark.parametrize("backend", ["mmap", "lmdb"])
def test_plan_build_verify_convert_roundtrip(world, tmp_path, backend, capsys):
    root, ckpt, corpus, counts = world
    assert main(["plan", str(counts), "--hbm", "2KiB", "--dram", "4KiB", "--target-hit", "0.9",
                 "--png", str(tmp_path / "plan.png")]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < plan["overall"]["hbm"] < 1 and (tmp_path / "plan.png").exists()

    store = tmp_path / "store"
    assert main(["build", "--checkpoint", str(ckpt), "--counts", str(counts), "--hbm", "2KiB", "--dram", "4KiB",
                 "--backend", backend, "-o", str(store), "--no-progress"]) == 0
    assert main(["verify", str(store), "--no-progress"]) == 0
    assert main(["inspect", str(store)]) == 0

    # Rows are in rank order: rank 0 is the most counted row.
    import engram_store

    c = Counts.load(counts)
    tables = load_checkpoint(ckpt).engram_tables()
    with engram_store.open(store, device="cpu") as s:
        for name in tables:
            np.testing.assert_array_equal(s.remap(name)[c.order(name)], np.arange(c.tables[name].size))
            ids = torch.randint(0, tables[name].shape[0], (64,))
            assert torch.equal(s.lookup(name, ids), tables[name][ids])

    out = tmp_path / "back.safetensors"
    assert main(["convert", str(store), "-o", str(out)]) == 0
    back = load_file(str(out))
    assert set(back) == set(tables)
    for name, t in tables.items():
        assert torch.equal(back[name], t)  # bit-exact

    other = "lmdb" if backend == "mmap" else "mmap"
    converted = tmp_path / "converted"
    assert main(["convert", str(store), "-o", str(converted), "--backend", other]) == 0
    out2 = tmp_path / "back2.safetensors"
    assert main(["convert", str(converted), "-o", str(out2)]) == 0
    for name, t in load_file(str(out2)).items():
        assert torch.equal(t, tables[name])


def test_verify_names_the_flipped_block(world, tmp_path, capsys):
    root, ckpt, corpus, counts = world
    store = tmp_path / "store"
    assert main(["build", "--checkpoint", str(ckpt), "--counts", str(counts), "-o", str(store), "--no-progress"]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    entry = manifest["tables"]["layer2"]
    rows_file = store / "layer2.rows"
    data = bytearray(rows_file.read_bytes())
    offset = 5 * entry["block_rows"] * entry["row_bytes"] + 3  # inside block 5
    data[offset] ^= 0x40
    rows_file.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(store), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "BAD table layer2 block 5 " in out
    assert json.loads(out.strip().splitlines()[-1])["bad_blocks"] == [["layer2", 5]]


def test_bad_input_is_one_clear_line(world, tmp_path, capsys):
    root, ckpt, corpus, counts = world
    out = tmp_path / "x.npz"
    cases = [
        (["count", "--checkpoint", str(ckpt), str(tmp_path / "missing.txt"), "-o", str(out)], "does not exist"),
        (["plan", str(counts), "--hbm", "3 parsecs"], "KiB, MiB"),
        (["build", "--checkpoint", str(ckpt), "--counts", str(counts), "--dram", "1XB", "-o", str(tmp_path / "s")],
         "cannot read size"),
        (["count", "--checkpoint", str(ckpt), str(corpus), "-o", str(counts)], "--overwrite"),
        (["verify", str(tmp_path / "nostore")], "no store"),
    ]
    other = _checkpoint(tmp_path / "other", seed=1)
    cases.append((["build", "--checkpoint", str(other), "--counts", str(counts), "-o", str(tmp_path / "s2")],
                  "count the corpus again"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    cases.append((["count", "--checkpoint", str(ckpt), str(tmp_path / "empty"), "-o", str(out)], "no tokens"))
    for argv, needle in cases:
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        if argv[0] == "verify":
            assert code == 1
            continue
        assert code == 2, argv
        # Progress bars may precede it; the error itself is one line.
        last = err.splitlines()[-1]
        assert last.startswith(f"engram-store {argv[0]}: error:") and needle in last, (argv, err)
    # Nothing half-written.
    assert not (tmp_path / "s").exists() and not (tmp_path / "s2").exists() and not out.exists()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*tmp*"))


def test_build_shards_and_join_back(world, tmp_path):
    root, ckpt, corpus, counts = world
    sharded = tmp_path / "sharded"
    assert main(["build", "--checkpoint", str(ckpt), "--counts", str(counts), "--shards", "3",
                 "--dram", "4KiB", "-o", str(sharded), "--no-progress"]) == 0
    assert sorted(p.name for p in sharded.iterdir() if p.is_dir()) == [f"shard-{i}-of-3" for i in range(3)]
    for i in range(3):
        assert main(["verify", str(sharded / f"shard-{i}-of-3"), "--no-progress"]) == 0
    out = tmp_path / "joined.safetensors"
    assert main(["convert", str(sharded), "-o", str(out)]) == 0
    tables = load_checkpoint(ckpt).engram_tables()
    joined = load_file(str(out))
    assert set(joined) == set(tables)
    for name, t in tables.items():
        assert torch.equal(joined[name], t)


def test_count_skips_binary_files_and_says_so(world, tmp_path, capsys):
    root, ckpt, corpus, counts = world
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "good.py").write_text("".join(DOCS[:30]))
    shutil.copyfile("/bin/ls", mixed / "ls.txt")
    (mixed / "latin.md").write_bytes("r\u00e9sum\u00e9 of f1\n".encode("latin-1"))
    out, ref_out = tmp_path / "mixed.npz", tmp_path / "good.npz"
    capsys.readouterr()
    assert main(["count", "--checkpoint", str(ckpt), str(mixed), "/bin/ls", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text.strip().splitlines()[-1])
    assert report["skipped"] == 3 and report["files"] == 1
    assert sorted(p for p, _ in report["skipped_files"]) == sorted(["/bin/ls", str(mixed / "latin.md"),
                                                                     str(mixed / "ls.txt")])
    assert "skipped 3 binary or non-UTF-8 files" in text and "ls.txt (binary (NUL byte" in text
    # The counts are those of the text file alone.
    assert main(["count", "--checkpoint", str(ckpt), str(mixed / "good.py"), "-o", str(ref_out), "--no-progress"]) == 0
    got, ref = Counts.load(out), Counts.load(ref_out)
    assert got.tokens == ref.tokens and got.files == 1
    for name in ref.tables:
        np.testing.assert_array_equal(got.tables[name], ref.tables[name])

    # Nothing but binary files: an error, and no counts file.
    only = tmp_path / "only"
    only.mkdir()
    shutil.copyfile("/bin/ls", only / "ls.txt")
    capsys.readouterr()
    bad = tmp_path / "bad.npz"
    assert main(["count", "--checkpoint", str(ckpt), str(only), "-o", str(bad), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("engram-store count: error: all 1 corpus files were skipped") and "ls.txt" in last
    assert not bad.exists()
