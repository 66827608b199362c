"""The storage library stands alone: importing it pulls in no model, pipeline, CLI, tokenizer,
progress bar or plotting code, and nothing in it imports them (layers point one way)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABOVE = ("engram_model", "engram_pipeline", "engram_store_cli", "tools", "tokenizers", "tqdm", "matplotlib")


def _imported_in_fresh_interpreter(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_engram_store_loads_nothing_above_it():
    # torch itself may import tqdm (torch.hub): what counts is what engram_store adds on top of
    # its own dependencies, each imported first.
    res = _imported_in_fresh_interpreter(
        "import sys, json\n"
        "import numpy, torch, numba, lmdb, zstandard, psutil\n"
        "before = set(sys.modules)\n"
        "import engram_store, engram_store.sharded, engram_store.writer\n"
        "new = sorted(set(sys.modules) - before)\n"
        "print(json.dumps({'new': new, 'before': sorted(before)}))\n")
    new_top = {m.split(".")[0] for m in res["new"]}
    assert "engram_store" in new_top  # the probe really imported it
    assert not new_top & set(ABOVE), f"importing engram_store also imported {sorted(new_top & set(ABOVE))}"


def test_import_engram_store_alone_loads_no_model_or_pipeline():
    res = _imported_in_fresh_interpreter(
        "import sys, json\nimport engram_store\nprint(json.dumps({'mods': sorted(sys.modules)}))\n")
    top = {m.split(".")[0] for m in res["mods"]}
    banned = {"engram_model", "engram_pipeline", "engram_store_cli", "tokenizers", "matplotlib"}
    assert not top & banned, f"importing engram_store also imported {sorted(top & banned)}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):  # every import, including those inside functions
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_of_the_library_imports_a_layer_above():
    offenders = {}
    for path in sorted((ROOT / "engram_store").rglob("*.py")):
        bad = _imports(path) & set(ABOVE)
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"engram_store modules import layers above the library: {offenders}"


def test_model_imports_no_pipeline_or_cli():
    offenders = {}
    for path in sorted((ROOT / "engram_model").rglob("*.py")):
        bad = _imports(path) & {"engram_pipeline", "engram_store_cli", "tools"}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"engram_model modules import the pipeline or the CLI: {offenders}"
