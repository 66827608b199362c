"""Hypothesis fuzz of every parser that reads a file someone else wrote: each malformed input is a clear error.

Parsers: a checkpoint's ``config.json`` (``HashConfig.from_hf_config`` and ``open_hf_checkpoint``),
``model.safetensors.index.json``, safetensors shard headers (JSON and raw bytes), the store's
``manifest.json`` (``read_manifest`` + ``table_info``) and a sharded store's ``shards.json``
(``read_layout``). Inputs are real documents (a generated V4.1-format checkpoint, a written store,
a written sharded store) mutated by Hypothesis: keys deleted, values replaced by any JSON value
(wrong types, huge or negative numbers, NaN, nested containers), whole documents replaced, bytes
truncated or flipped. A manifest is fuzzed both as written (its checksum must catch the edit) and
re-sealed after the edit (so the structure checks behind the checksum are reached too).

The property: the parser returns, or raises an ``EngramStoreError`` subclass with a message; never
another exception type from deep inside (KeyError, TypeError, AttributeError, json errors ...).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engram_store
from engram_model.hashing import HashConfig
from engram_pipeline.hf_checkpoint import INDEX, open_hf_checkpoint, read_safetensors_header
from engram_pipeline.v41_checkpoint import write_v41_checkpoint
from engram_store.errors import EngramStoreError
from engram_store.format import MANIFEST, read_manifest, table_info
from engram_store.format.manifest import manifest_bytes, seal_manifest
from engram_store.sharded import LAYOUT_FILE, read_layout, write_shards

pytestmark = pytest.mark.reliability

EXAMPLES = int(os.environ.get("ENGRAM_FUZZ_EXAMPLES", "100"))  # per parser; the long run uses thousands
RUN = {"cases": 0, "errors": 0}  # what ran, for the reliability table


def fuzz_settings(n: int = EXAMPLES):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def clean(fn) -> str:
    """Run one parse: "ok", or "error" for an EngramStoreError with a message; anything else propagates."""
    RUN["cases"] += 1
    try:
        fn()
    except EngramStoreError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        RUN["errors"] += 1
        return "error"
    return "ok"


# -- strategies -------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-3, 3000) | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
           | st.sampled_from(["", "F8_E4M3", "F8_E8M0", "BF16", "uint8", "float32", "row_mod_n", "head_ranges",
                              "mmap", "lmdb", "fp8_e4m3_ue8m0", "engram-store"]))
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=8)


@st.composite
def mutated(draw, doc):
    """``doc`` with 1-3 edits at random depths: a key deleted, a value replaced, a key added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        parent, key, node = None, None, doc
        for _ in range(draw(st.integers(0, 4))):
            if isinstance(node, dict) and node:
                k = draw(st.sampled_from(sorted(node, key=str)))
            elif isinstance(node, list) and node:
                k = draw(st.integers(0, len(node) - 1))
            else:
                break
            parent, key, node = node, k, node[k]
        op = draw(st.sampled_from(["replace", "delete", "add", "replace"]))
        if parent is None:
            if op == "replace":
                doc = draw(JSON)
            elif isinstance(doc, dict):
                doc[draw(st.text(max_size=6))] = draw(JSON)
            continue
        if op == "delete":
            del parent[key]
        elif op == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=6))] = draw(JSON)
        elif op == "add" and isinstance(node, list):
            node.append(draw(JSON))
        else:
            parent[key] = draw(JSON)
    return doc


def mutated_at(doc, path: tuple):
    """``doc`` with the sub-document at ``path`` mutated (reaches fields deeper than ``mutated`` usually goes)."""
    node = doc
    for k in path:
        node = node[k]

    def put(new):
        out = copy.deepcopy(doc)
        at = out
        for k in path[:-1]:
            at = at[k]
        at[path[-1]] = new
        return out

    return mutated(node).map(put)


def dumps(doc) -> str:
    return json.dumps(doc, allow_nan=True)


@st.composite
def mangled_bytes(draw, raw: bytes):
    """``raw`` truncated, with flipped bytes, or replaced by junk."""
    op = draw(st.sampled_from(["truncate", "flip", "junk", "prefix"]))
    if op == "truncate":
        return raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
    if op == "flip":
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
        return bytes(b)
    if op == "junk":
        return draw(st.binary(max_size=64))
    return draw(st.binary(min_size=1, max_size=8)) + raw


# -- the real documents -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-v41") / "ckpt"
    write_v41_checkpoint(path, engram_vocab_size=60, layer_ids=(1, 14), seed=0, progress=False)
    with open_hf_checkpoint(path):  # the valid one opens (and warms the tokenizer cache)
        pass
    return path


class Scratch:
    """A checkpoint directory of links to the real files, with one file replaced per example."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.dir = Path(tempfile.mkdtemp(prefix="fuzz-"))

    def with_file(self, name: str, data: bytes) -> Path:
        d = self.dir / "c"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        for f in self.src.iterdir():
            (d / f.name).symlink_to(f)
        (d / name).unlink(missing_ok=True)
        (d / name).write_bytes(data)
        return d

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def scratch(ckpt):
    s = Scratch(ckpt)
    yield s
    s.close()


def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


# -- config.json ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lookup(ckpt):
    with open_hf_checkpoint(ckpt) as c:
        return c.compression.lookup


def test_from_hf_config_fuzz(ckpt, lookup):
    base = _config(ckpt)
    assert clean(lambda: HashConfig.from_hf_config(base, lookup)) == "ok"

    @fuzz_settings()
    @given(mutated(base) | mutated_at(base, ("text_config",)))
    def run(cfg):
        clean(lambda: HashConfig.from_hf_config(cfg, lookup))

    run()


@pytest.mark.parametrize("field", ["engram_n_heads", "engram_max_ngram_size", "engram_vocab_size",
                                   "engram_num_embeddings", "engram_layer_ids", "engram_compressed_vocab_size",
                                   "engram_pad_token_id"])
def test_from_hf_config_out_of_range_fields_are_refused_at_once(ckpt, lookup, field):
    """Huge values are refused before any prime search (a fuzzed 10**9 heads hung the open before the bounds)."""
    for value in [10**9, 2**40, 2**63, -1, 1.5, math.inf, "8", None, [8], True, [1] * 2000]:
        cfg = _config(ckpt)
        cfg["text_config"][field] = value
        t0 = time.perf_counter()
        assert clean(lambda: HashConfig.from_hf_config(cfg, lookup)) == "error", (field, value)
        assert time.perf_counter() - t0 < 5.0, (field, value)


def test_open_hf_checkpoint_config_fuzz(ckpt, scratch):
    base = _config(ckpt)

    @fuzz_settings(EXAMPLES // 2)
    @given((mutated(base) | mutated_at(base, ("text_config",))).map(lambda d: dumps(d).encode())
           | mangled_bytes(dumps(base).encode()))
    def run(data):
        clean(lambda: open_hf_checkpoint(scratch.with_file("config.json", data)).close())

    run()


def test_open_hf_checkpoint_index_fuzz(ckpt, scratch):
    raw = (ckpt / INDEX).read_bytes()

    @fuzz_settings(EXAMPLES // 2)
    @given(mutated(json.loads(raw)).map(lambda d: dumps(d).encode()) | mangled_bytes(raw))
    def run(data):
        clean(lambda: open_hf_checkpoint(scratch.with_file(INDEX, data)).close())

    run()


# -- safetensors headers ----------------------------------------------------------------------

def _engram_shard(ckpt: Path) -> Path:
    wmap = json.loads((ckpt / INDEX).read_text())["weight_map"]
    return ckpt / wmap["layers.1.engram.embed.weight"]


def _with_header(header: dict, data: bytes) -> bytes:
    js = dumps(header).encode()
    js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js + data


def test_safetensors_header_fuzz(ckpt, scratch):
    shard = _engram_shard(ckpt)
    raw = shard.read_bytes()
    header, data_start, _ = read_safetensors_header(shard)
    data = raw[data_start:]
    head_only = raw[:data_start]

    @fuzz_settings()
    @given((mutated(header) | mutated_at(header, ("layers.1.engram.embed.weight",))
            | mutated_at(header, ("layers.1.engram.embed.scale",))).map(lambda h: _with_header(h, data))
           | mangled_bytes(head_only).map(lambda h: h + data)
           | st.integers(0, len(raw) - 1).map(lambda n: raw[:n]))
    def run(blob):
        path = scratch.with_file(shard.name, blob)
        clean(lambda: read_safetensors_header(path / shard.name))
        clean(lambda: open_hf_checkpoint(path).close())

    run()


# -- manifest.json ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-store") / "s"
    with engram_store.StoreWriter(path) as w:
        w.add_table("q", 40, 264, torch.uint8, row_format="fp8_e4m3_ue8m0")
        w.write_rows("q", torch.zeros(40, 264, dtype=torch.uint8))
        w.add_table("f", 30, 4, torch.float16)
        w.write_rows("f", torch.ones(30, 4, dtype=torch.float16))
    return path


def _parse_manifest(path: Path) -> None:
    m = read_manifest(path)
    for name, entry in m["tables"].items():
        table_info(name, entry)


def test_manifest_fuzz(store, tmp_path):
    base = json.loads((store / MANIFEST).read_text())
    d = tmp_path / "m"
    d.mkdir()

    @fuzz_settings()
    @given(mutated(base) | mutated_at(base, ("tables", "q")) | mutated_at(base, ("tables", "f")),
           st.sampled_from(["as-edited", "re-sealed", "re-sealed", "bytes"]), mangled_bytes(manifest_bytes(base)))
    def run(doc, how, blob):
        if how == "bytes":
            (d / MANIFEST).write_bytes(blob)
        elif how == "re-sealed" and isinstance(doc, dict):
            (d / MANIFEST).write_text(dumps(seal_manifest({k: v for k, v in doc.items() if k != "manifest_crc32"})))
        else:
            (d / MANIFEST).write_text(dumps(doc))
        clean(lambda: _parse_manifest(d))

    run()


def test_table_info_fuzz(store):
    base = json.loads((store / MANIFEST).read_text())["tables"]

    @fuzz_settings()
    @given(st.sampled_from(sorted(base)).flatmap(lambda n: st.tuples(st.just(n), mutated(base[n]) | JSON)))
    def run(case):
        name, entry = case
        clean(lambda: table_info(name, entry))

    run()


# -- shards.json ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["row_mod_n", "head_ranges"])
def layout_doc(request, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("fuzz-shards") / "sh"
    kw = {"head_rows": {"t": [20, 20, 24, 24]}} if request.param == "head_ranges" else {}
    write_shards(path, {"t": torch.arange(88 * 4, dtype=torch.float32).reshape(88, 4)}, None, 2,
                 owner=request.param, **kw)
    doc = json.loads((path / LAYOUT_FILE).read_text())
    read_layout(path)  # the valid one parses
    return doc


def test_shards_json_fuzz(layout_doc, tmp_path):
    d = tmp_path / "sh"
    d.mkdir()

    @fuzz_settings()
    @given((mutated(layout_doc) | mutated_at(layout_doc, ("tables", "t"))).map(lambda x: dumps(x).encode())
           | mangled_bytes(dumps(layout_doc).encode()))
    def run(blob):
        (d / LAYOUT_FILE).write_bytes(blob)
        clean(lambda: read_layout(d))

    run()


def test_deeply_nested_json_is_a_clear_error(store, scratch, tmp_path):
    """json's RecursionError on pathological nesting is a parse error like any other."""
    deep = b"[" * 200_000 + b"]" * 200_000
    d = tmp_path / "m"
    d.mkdir()
    (d / MANIFEST).write_bytes(deep)
    assert clean(lambda: read_manifest(d)) == "error"
    (d / LAYOUT_FILE).write_bytes(deep)
    assert clean(lambda: read_layout(d)) == "error"
    assert clean(lambda: open_hf_checkpoint(scratch.with_file("config.json", deep)).close()) == "error"
    assert clean(lambda: open_hf_checkpoint(scratch.with_file(INDEX, deep)).close()) == "error"


HOLES = {  # inputs the fuzz found raising from deep inside before the parsers were fixed; each stays an error
    "safetensors shape None": ("weight", {"shape": None}),
    "safetensors shape of strings": ("weight", {"shape": "F8"}),
    "safetensors data_offsets []": ("scale", {"data_offsets": []}),
    "safetensors data_offsets None": ("scale", {"data_offsets": None}),
    "safetensors shape [true, 256]": ("weight", {"shape": [True, 256]}),
}


@pytest.mark.parametrize("case", list(HOLES))
def test_found_safetensors_holes_stay_closed(ckpt, scratch, case):
    which, edit = HOLES[case]
    shard = _engram_shard(ckpt)
    raw = shard.read_bytes()
    header, data_start, _ = read_safetensors_header(shard)
    header[f"layers.1.engram.embed.{which}"].update(edit)
    path = scratch.with_file(shard.name, _with_header(header, raw[data_start:]))
    assert clean(lambda: open_hf_checkpoint(path).close()) == "error"


@pytest.mark.parametrize("edit", [{"row_bytes": None}, {"rows": "30"}, {"rows": 30.5}, {"dim": True},
                                  {"dtype": ["uint8"]}, {"row_format": ["fp8_e4m3_ue8m0"]}, {"rows": math.inf}])
def test_found_table_info_holes_stay_closed(store, edit):
    entry = {**json.loads((store / MANIFEST).read_text())["tables"]["q"], **edit}
    assert clean(lambda: table_info("q", entry)) == "error"
    assert clean(lambda: table_info("q", [entry])) == "error"


def test_found_shards_json_hole_stays_closed(layout_doc, tmp_path):
    doc = copy.deepcopy(layout_doc)
    doc["tables"]["t"]["dtype"] = ["float32"]
    (tmp_path / LAYOUT_FILE).write_text(dumps(doc))
    assert clean(lambda: read_layout(tmp_path)) == "error"


def test_print_fuzz_totals():
    """Runs last in this file: the figures for docs/reliability.md."""
    print(f"\nRELIABILITY fuzz: {RUN['cases']} parses of malformed or edited inputs, {RUN['errors']} clear "
          f"EngramStoreErrors, 0 other exceptions")
    assert RUN["cases"] > 0


@pytest.mark.reliability_long
def test_fuzz_long(ckpt, lookup, store, tmp_path):
    """The same properties with many more examples (ENGRAM_FUZZ_EXAMPLES sets the short run's count)."""
    base = _config(ckpt)

    @fuzz_settings(5000)
    @given(mutated(base))
    def cfg(c):
        clean(lambda: HashConfig.from_hf_config(c, lookup))

    cfg()
    tables = json.loads((store / MANIFEST).read_text())["tables"]

    @fuzz_settings(5000)
    @given(st.sampled_from(sorted(tables)).flatmap(lambda n: st.tuples(st.just(n), mutated(tables[n]) | JSON)))
    def info(case):
        clean(lambda: table_info(*case))

    info()
    print(f"\nRELIABILITY fuzz long: {RUN['cases']} parses")
