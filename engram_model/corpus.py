"""Corpus helpers: the standard library as a corpus that is on every machine, file reading, splits."""

from __future__ import annotations

import gzip
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from engram_store.errors import EngramStoreError, StoreNotFoundError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".html")


def stdlib_files() -> list[Path]:
    """The running Python's standard-library ``.py`` files (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def expand_paths(paths: Iterable) -> list[Path]:
    """Files as given, folders expanded to their text files (recursively, sorted)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(
                (f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.name.endswith(".gz"))),
                key=lambda f: f.as_posix(),
            ))
        elif p.exists():
            out.append(p)
        else:
            raise StoreNotFoundError(f"corpus path {p} does not exist")
    return out


def read_text(path: Path) -> str:
    """A file's text (gzip when the name ends in .gz); undecodable bytes are replaced."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise StoreNotFoundError(f"corpus file {path} does not exist") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise EngramStoreError(f"cannot read corpus file {path}: {exc}") from None
    return data.decode("utf-8", errors="replace")


def iter_texts(paths: Iterable) -> Iterator[str]:
    """The text of every file under ``paths`` (files and folders; plain and .gz)."""
    for f in expand_paths(paths):
        yield read_text(f)


def _common_root(files: list[Path]) -> Path | None:
    try:
        return Path(os.path.commonpath([str(f.resolve()) for f in files]))
    except ValueError:
        return None


def split_files(files: Iterable, held_out_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, held_out) split by a hash of each path relative to the files' common root.

    The same tree gives the same split on every machine, wherever it is installed.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise EngramStoreError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    files = [Path(f) for f in files]
    root = _common_root(files) if len(files) > 1 else None
    train, held = [], []
    for f in files:
        rel = f.resolve().relative_to(root).as_posix() if root is not None else f.name
        u = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64
        (held if u < held_out_fraction else train).append(f)
    return train, held
