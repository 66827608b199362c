"""Corpus helpers: the standard library as a corpus that is on every machine, file reading, splits.

A corpus file that is not text is skipped, not tokenized: a NUL byte in its first
``SNIFF_BYTES`` bytes (executables, images, archives: UTF-8 text never holds one) or bytes
that do not decode as UTF-8. Tokenizing such a file would count rows of garbage that no
prompt asks for.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from engram_store.errors import EngramStoreError, StoreNotFoundError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".html")
SNIFF_BYTES = 8192  # where a binary file shows a NUL byte (the same window git and grep look at)


class Skipped(NamedTuple):
    """A corpus file left out, and why."""

    path: Path
    reason: str


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


def _read_bytes(path: Path) -> bytes:
    """A file's bytes (decompressed when the name ends in .gz)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise StoreNotFoundError(f"corpus file {path} does not exist") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise EngramStoreError(f"cannot read corpus file {path}: {exc}") from None


def read_text(path: Path) -> str:
    """A file's text (gzip when the name ends in .gz); undecodable bytes are replaced."""
    return _read_bytes(path).decode("utf-8", errors="replace")


def texts_up_to(files: Iterable, max_chars: int) -> list[str]:
    """The texts of ``files`` in order, stopping after the file that reaches ``max_chars`` characters."""
    out, n = [], 0
    for f in files:
        out.append(read_text(f))
        n += len(out[-1])
        if n >= max_chars:
            break
    return out


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """``(text, None)`` when ``data`` is text, else ``(None, why)``: a NUL byte near the start, or not UTF-8."""
    nul = data.find(b"\0", 0, SNIFF_BYTES)
    if nul >= 0:
        return None, f"binary (NUL byte at offset {nul})"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"


def read_corpus_text(path: Path) -> tuple[str | None, str | None]:
    """``(text, None)`` for a text file, ``(None, why)`` for one to skip (see the module docstring)."""
    return decode_text(_read_bytes(Path(path)))


def iter_texts(paths: Iterable, skipped: list[Skipped] | None = None) -> Iterator[str]:
    """The text of every text file under ``paths`` (files and folders; plain and .gz).

    Binary or undecodable files are skipped; when ``skipped`` is a list, each is appended to it.
    """
    for f in expand_paths(paths):
        text, reason = read_corpus_text(f)
        if text is None:
            if skipped is not None:
                skipped.append(Skipped(f, reason))
            continue
        yield text


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
