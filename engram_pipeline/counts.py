"""Exact per-row access counts of every Engram table over a corpus.

The build tool ranks rows by these counts (frequency-ordered layout, DESIGN.md). Counting
goes through the checkpoint's own tokenizer, compression and hash config, so the counts
address exactly the rows the model will ask for. Each file is one sequence: the N-gram
row of position t depends only on tokens t-max_ngram+1..t, so this matches the model's
accesses except at the few left-padded positions where a window starts. The checkpoint is
one of ours, a Hugging Face V4.1-style directory, or just such a directory's ``config.json``
and ``tokenizer.json`` (counting needs no table bytes).

A counts file is an ``.npz``: one little-endian uint32 array per table (``layer{L}``, one
count per row) and ``__meta__``, a JSON string holding ``format`` (``engram-counts/2``), the
fingerprint, the hash config, table dims, the token and file counts. Counts files with the same
fingerprint merge exactly (element-wise sums). ``row_format`` names how the checkpoint stores a
row (``float32``, ..., ``fp8_e4m3_ue8m0`` for V4.1), so a plan sizes tiers in the right bytes. A count that would pass 2**32 - 1 raises
CountOverflowError instead of wrapping.

Memory, with R = rows of all tables together (V4.1: 768,022,850), W worker processes, B the
interpreter + torch + tokenizer baseline of one process (~0.3-0.5 GB) and T the hash chunk
(``CHUNK_TOKENS``):

    each worker  B + 4 R + 8 T K L   (its uint32 totals; row ids of one chunk: K heads, L layers)
    the parent   B                   while the workers count,
                 B + 4 R + 4 M       while merging, after they have exited (M = ``MERGE_ROWS``)
    peak RSS     max(W (B + 4 R) + B, B + 4 R)       V4.1, W = 2: ~6.1 GB + 3 B

No step builds an int64 (or any other) temporary of table size: workers add row ids in place with
a compiled loop, write their totals to a scratch file (W * 4 R bytes of disk while counting), and
the parent reads the first one as its totals and adds the others chunk by chunk.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from engram_model.memory import table_name
from engram_store import errors
from engram_store.errors import (
    CheckpointError, CountOverflowError, EngramStoreError, FingerprintMismatchError, StoreCorruptError,
    StoreNotFoundError,
)

FORMAT = "engram-counts/2"
OLD_FORMATS = {"engram-counts/1": "int64 counts"}
COUNT_DTYPE = np.dtype("<u4")
MAX_COUNT = int(np.iinfo(np.uint32).max)
CHUNK_TOKENS = 1 << 15  # positions hashed at once: 24 heads x 2 layers x 8 B = 12 MiB of row ids
MERGE_ROWS = 1 << 22  # rows per chunk when adding a worker's totals: 16 MiB
SMALL_COUNTS = 1 << 16  # counts below this are histogrammed densely; larger ones are few (<= total / 2**16)
SKIPPED_SHOWN = 5  # skipped files named in the report
FP8_ROWS = "fp8_e4m3_ue8m0"  # V4.1's packed rows (engram_pipeline.plan.FP8_ROWS)


# -- compiled kernels ---------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _add_rows(total, rows):
    """``total[r] += 1`` for each r in ``rows``; the position of the first row that is out of range or
    would overflow, or -1. (``np.add.at`` is slow; ``bincount`` allocates an int64 table per call.)"""
    n = total.size
    for i in range(rows.size):
        r = rows[i]
        if r < 0 or r >= n or total[r] == 0xFFFFFFFF:
            return i
        total[r] += 1
    return -1


@njit(nogil=True, cache=True)
def _add_counts(total, other):
    """``total += other`` in place (same length); the first index that would overflow, or -1."""
    top = np.uint32(0xFFFFFFFF)
    for i in range(total.size):
        if other[i] > top - total[i]:
            return i
        total[i] += other[i]
    return -1


@njit(nogil=True, cache=True)
def _small_histogram(counts, k):
    """(rows with count c for c < k, number of rows with count >= k)."""
    hist = np.zeros(k, np.int64)
    big = 0
    for i in range(counts.size):
        c = counts[i]
        if c < k:
            hist[c] += 1
        else:
            big += 1
    return hist, big


@njit(nogil=True, cache=True)
def _big_counts(counts, k, n):
    out = np.empty(n, counts.dtype)
    j = 0
    for i in range(counts.size):
        if counts[i] >= k:
            out[j] = counts[i]
            j += 1
    return out


@njit(nogil=True, cache=True)
def _place(counts, small_group, big_values, big_group, starts, out):
    """Counting sort: row r goes to the next free slot of its count's group (rows visited in id order,
    so ties stay in row-id order)."""
    k = small_group.size
    for r in range(counts.size):
        c = counts[r]
        if c < k:
            g = small_group[c]
        else:
            g = big_group[np.searchsorted(big_values, c)]
        out[starts[g]] = r
        starts[g] += 1


def add_rows(total: np.ndarray, rows: np.ndarray, table: str = "table") -> None:
    """``total[r] += multiplicity of r in rows`` (uint32 in place); CountOverflowError rather than wrap."""
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    bad = _add_rows(total, rows)
    if bad >= 0:
        r = int(rows[bad])
        if not 0 <= r < total.size:
            raise EngramStoreError(f"row id {r} is outside table {table!r} of {total.size} rows (a hashing bug)")
        raise CountOverflowError(f"row {r} of {table!r} was accessed more than {MAX_COUNT:,} times: the corpus is "
                                 "too large for one counts file; count it in parts and plan from each part")


def add_counts(total: np.ndarray, other: np.ndarray, table: str = "table", offset: int = 0) -> None:
    """``total += other`` (uint32 in place, no int64 temporary); CountOverflowError rather than wrap."""
    bad = _add_counts(total, other)
    if bad >= 0:
        raise CountOverflowError(f"row {offset + bad} of {table!r} would count more than {MAX_COUNT:,} accesses "
                                 "after merging: merge fewer counts files")


def count_histogram(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct counts, descending; rows holding each) of one table, both int64 and short.

    Tier sizes and hit rates depend only on the sorted counts, which this gives exactly; memory is
    a 512 KiB histogram plus the few rows counted at least ``SMALL_COUNTS`` times.
    """
    counts = np.ascontiguousarray(counts)
    hist, n_big = _small_histogram(counts, SMALL_COUNTS)
    small = np.flatnonzero(hist)
    values, rows = small.astype(np.int64), hist[small]
    if n_big:
        big, big_rows = np.unique(_big_counts(counts, SMALL_COUNTS, n_big), return_counts=True)
        values = np.concatenate([values, big.astype(np.int64)])
        rows = np.concatenate([rows, big_rows.astype(np.int64)])
    return values[::-1].copy(), rows[::-1].copy()


def descending_order(counts: np.ndarray) -> np.ndarray:
    """Row ids by descending count, ties by row id: ``np.argsort(-counts, kind="stable")``, computed as a
    counting sort (one pass, no temporary of table size); int32 when the table has < 2**31 rows."""
    counts = np.ascontiguousarray(counts)
    values, rows = count_histogram(counts)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    small = values < SMALL_COUNTS
    small_group = np.full(SMALL_COUNTS, -1, dtype=np.int64)
    small_group[values[small]] = np.flatnonzero(small)
    big_idx = np.flatnonzero(~small)[::-1]  # ascending values, for the binary search
    big_values = values[big_idx].astype(counts.dtype)
    out = np.empty(counts.size, dtype=np.int32 if counts.size < 2**31 else np.int64)
    _place(counts, small_group, big_values, big_idx.astype(np.int64), starts, out)
    return out


def as_counts(table, name: str = "table") -> np.ndarray:
    """``table`` as a 1-D uint32 count array (no copy when it already is one)."""
    a = np.asarray(table)
    if a.dtype == COUNT_DTYPE and a.ndim == 1:
        return np.ascontiguousarray(a)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise EngramStoreError(f"counts of {name!r} must be a 1-D integer array, got {a.dtype} {a.shape}")
    if a.size and (int(a.min()) < 0 or int(a.max()) > MAX_COUNT):
        raise CountOverflowError(f"counts of {name!r} must be in 0..{MAX_COUNT:,} (uint32), "
                                 f"got {int(a.min())}..{int(a.max())}")
    return a.astype(COUNT_DTYPE)


@dataclass
class Counts:
    """Access counts per table (``tables[name][row]``, uint32) under one hash-config fingerprint."""

    fingerprint: str
    tables: dict[str, np.ndarray]
    hash_config: dict = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    files: int = 0
    row_format: str = ""  # the checkpoint's row format ("" when unknown)

    def __post_init__(self) -> None:
        self.tables = {n: as_counts(t, n) for n, t in self.tables.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (``*.partial`` then rename) so a crash never leaves half a file."""
        path = Path(path)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "hash_config": self.hash_config,
                "dims": self.dims, "tokens": self.tokens, "files": self.files, "row_format": self.row_format}
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as f:
                np.savez(f, __meta__=np.array(json.dumps(meta, sort_keys=True)), **self.tables)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Counts:
        path = Path(path)
        if not path.is_file():
            raise StoreNotFoundError(f"counts file {path} does not exist: make one with `engram-store count`")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                fmt = meta.get("format")
                if fmt != FORMAT:
                    old = OLD_FORMATS.get(fmt)
                    why = f"an older engram-store's ({old})" if old else "unknown to this engram-store"
                    raise StoreCorruptError(f"{path} has format {fmt!r}, {why}; this version reads {FORMAT!r}: "
                                            "count the corpus again with `engram-store count`")
                tables = {}
                for k in z.files:
                    if k == "__meta__":
                        continue
                    a = z[k]
                    if a.dtype != COUNT_DTYPE or a.ndim != 1:
                        raise StoreCorruptError(f"{path}: table {k!r} is {a.dtype} {a.shape}, expected 1-D uint32; "
                                                "count the corpus again")
                    tables[k] = a
        except StoreCorruptError:
            raise
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise StoreCorruptError(f"{path} is not a readable counts file ({exc}); count the corpus again") from exc
        return cls(meta["fingerprint"], tables, meta.get("hash_config", {}), meta.get("dims", {}),
                   int(meta.get("tokens", 0)), int(meta.get("files", 0)), str(meta.get("row_format", "")))

    def check_fingerprint(self, fingerprint: str, what: str = "the checkpoint") -> None:
        if self.fingerprint != fingerprint:
            raise FingerprintMismatchError(
                f"counts were made for hash config {self.fingerprint[:12]}…, but {what} has "
                f"{fingerprint[:12]}…: count the corpus again with that checkpoint"
            )

    def order(self, table: str) -> np.ndarray:
        """Row ids by descending count (ties by row id): ``order[rank] = row``; int32 below 2**31 rows."""
        return descending_order(self.tables[table])

    def _add(self, other: Counts, what: str) -> None:
        other.check_fingerprint(self.fingerprint, what)
        if set(other.tables) != set(self.tables) or any(other.tables[k].shape != v.shape for k, v in self.tables.items()):
            raise FingerprintMismatchError("counts files hold different tables or table sizes; they cannot be merged")
        for k, v in self.tables.items():
            add_counts(v, other.tables[k], k)
        self.tokens += other.tokens
        self.files += other.files


def merge(counts: Sequence[Counts]) -> Counts:
    """Exact sum of counts made under one fingerprint (corpora counted apart)."""
    if not counts:
        raise EngramStoreError("nothing to merge: give at least one counts file")
    first = counts[0]
    total = Counts(first.fingerprint, {k: v.copy() for k, v in first.tables.items()}, first.hash_config,
                   first.dims, first.tokens, first.files, first.row_format)
    for other in counts[1:]:
        total._add(other, "the first counts file")
    return total


def merge_files(paths: Sequence[str | os.PathLike]) -> Counts:
    """``merge`` of counts files, holding at most two of them in memory at once."""
    if not paths:
        raise EngramStoreError("nothing to merge: give at least one counts file")
    total = Counts.load(paths[0])
    for p in paths[1:]:
        total._add(Counts.load(p), f"the first counts file {paths[0]}")
    return total


# -- what counting needs from a checkpoint -------------------------------------------------

@dataclass(frozen=True)
class CountSource:
    """A checkpoint's tokenizer, compression and hash config, small enough to send to worker processes
    (the compression table is built once, in the parent: for V4's 129,280 ids that takes seconds)."""

    path: str
    tokenizer_file: str
    lookup: np.ndarray  # compression: original id -> compressed id
    hash_config: dict
    fingerprint: str
    rows: dict[str, int]  # table -> rows
    dims: dict[str, int]  # table -> values per row
    row_format: str  # how the checkpoint stores a row: float32, float16, bfloat16 or fp8_e4m3_ue8m0


def hf_config_source(config: dict, tokenizer_file, path: str = "") -> CountSource:
    """The counting source of a V4.1-style ``config.json`` dict and its tokenizer: no table bytes needed.
    ``HashConfig.from_hf_config`` checks what the model would (fields, compressed vocabulary size, the
    table sizes as head-prime sums)."""
    from engram_model.hashing import HashConfig, NgramHasher, fingerprint
    from engram_pipeline.hf_checkpoint import HEAD_DIM, compressed_tokenizer

    tok = Path(tokenizer_file)
    if not tok.is_file():
        raise StoreNotFoundError(f"{tok} not found: counting needs the checkpoint's tokenizer.json")
    compression = compressed_tokenizer(tok)
    try:
        hash_config = HashConfig.from_hf_config(config, compression)
    except EngramStoreError as e:
        raise type(e)(f"{path}: {e}" if path else str(e)) from None
    rows = {table_name(lid): n for lid, n in NgramHasher(hash_config).table_rows.items()}
    return CountSource(path, str(tok), compression.lookup, hash_config.to_dict(),
                       fingerprint(hash_config, compression.lookup), rows, {n: HEAD_DIM for n in rows}, FP8_ROWS)


def count_source(checkpoint) -> CountSource:
    """What counting needs from ``checkpoint``: one of ours, a Hugging Face V4.1-style directory, or a
    directory holding only such a ``config.json`` and ``tokenizer.json``."""
    if isinstance(checkpoint, CountSource):
        return checkpoint
    from engram_pipeline.hf_checkpoint import INDEX, is_hf_checkpoint, open_hf_checkpoint

    root = Path(checkpoint)
    if is_hf_checkpoint(root):
        if not (root / INDEX).is_file():
            config = json.loads((root / "config.json").read_text())
            return hf_config_source(config, root / "tokenizer.json", str(root))
        with open_hf_checkpoint(root) as ck:
            return CountSource(str(root), str(ck.tokenizer_path), ck.compression.lookup, ck.hash_config.to_dict(),
                               ck.fingerprint, {n: t.rows for n, t in ck.tables.items()},
                               {n: ck.dim for n in ck.tables}, FP8_ROWS)
    from engram_model.checkpoint import load_checkpoint

    ck = load_checkpoint(root)
    if ck.hash_config is None:
        raise CheckpointError(f"{root} has no Engram layers: there is nothing to count")
    tables = ck.engram_tables()
    return CountSource(str(root), str(root / "tokenizer.json"), ck.compression.lookup, ck.hash_config.to_dict(),
                       ck.fingerprint, {n: int(t.shape[0]) for n, t in tables.items()},
                       {n: int(t.shape[1]) for n, t in tables.items()},
                       str(next(iter(tables.values())).dtype).removeprefix("torch."))


# -- counting ----------------------------------------------------------------------------

def expand_corpus(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The corpus's files (folders expanded), each checked readable before any work starts."""
    from engram_model.corpus import expand_paths

    files = expand_paths(paths)
    for f in files:
        if not os.access(f, os.R_OK):
            raise EngramStoreError(f"corpus file {f} is not readable: check its permissions")
    return files


class _Counter:
    """Per-process state: the tokenizer, compression and hasher rebuilt from a CountSource."""

    def __init__(self, source: CountSource) -> None:
        from tokenizers import Tokenizer

        from engram_model.compression import CompressedTokenizer
        from engram_model.hashing import HashConfig, NgramHasher

        self.tokenizer = Tokenizer.from_file(source.tokenizer_file)
        self.compression = CompressedTokenizer(source.lookup)
        self.hasher = NgramHasher(HashConfig.from_dict(source.hash_config))
        self.rows = {table_name(lid): n for lid, n in self.hasher.table_rows.items()}
        assert self.rows == source.rows, (self.rows, source.rows)
        self.context = self.hasher.config.max_ngram - 1
        # Load the compiled kernel and warm torch up now, so that start-up is not timed as the first file's.
        _add_rows(np.zeros(1, COUNT_DTYPE), np.zeros(1, np.int64))
        self.hasher.row_ids(np.zeros((1, 4), dtype=np.int64))

    def zeros(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(n, dtype=COUNT_DTYPE) for name, n in self.rows.items()}

    def count(self, text: str, totals: dict[str, np.ndarray], hash_rows: bool = True) -> tuple[int, dict]:
        """Add the row accesses of ``text`` into ``totals``; return its token count and the seconds spent
        tokenizing vs hashing + counting. Long texts are hashed ``CHUNK_TOKENS`` positions at a time, each
        chunk with the ``max_ngram - 1`` tokens before it, so the rows are those of the whole sequence."""
        import torch

        t0 = time.perf_counter()
        ids = np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)
        t1 = time.perf_counter()
        if hash_rows and ids.size:
            compressed = torch.from_numpy(np.asarray(self.compression.compress(ids), dtype=np.int64))
            for a in range(0, ids.size, CHUNK_TOKENS):
                lo = max(0, a - self.context)
                window = compressed[lo:a + CHUNK_TOKENS][None]
                for lid, rows in self.hasher.row_ids(window).items():
                    name = table_name(lid)
                    add_rows(totals[name], rows[0, a - lo:].reshape(-1).numpy(), name)
        return int(ids.size), {"tokenize": t1 - t0, "hash_count": time.perf_counter() - t1}


def _worker_main(source_file: str, files: list[str], hash_rows: bool, out_prefix: str, events) -> None:
    """One process: count its share of files, report progress per file, write totals next to ``out_prefix``.

    The CountSource comes through a file: a megabyte of pickled arguments would block the parent in
    ``start()`` until the child reads them, forever if the child dies first."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import pickle

        import torch

        with open(source_file, "rb") as f:
            source = pickle.load(f)

        from engram_model.corpus import read_corpus_text

        torch.set_num_threads(1)  # one process per core does the parallelism
        counter = _Counter(source)
        totals = counter.zeros()
        n_tokens = 0
        # Seconds spent on the files themselves (no start-up), split by phase, for throughput figures.
        work = {"total": 0.0, "tokenize": 0.0, "hash_count": 0.0}
        for path in files:
            t = time.perf_counter()
            text, reason = read_corpus_text(Path(path))
            if text is None:
                events.put(("skipped", path, reason))
                continue
            tokens, phases = counter.count(text, totals, hash_rows)
            work["total"] += time.perf_counter() - t
            for k, v in phases.items():
                work[k] += v
            n_tokens += tokens
            events.put(("progress", os.path.getsize(path), tokens))
        # Totals go through files, not the pipe: a V4.1 table is 1.5 GB. Raw bytes, no copy.
        if hash_rows:
            for name, total in totals.items():
                total.tofile(f"{out_prefix}.{name}.u32")
        work["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        events.put(("done", n_tokens, work))
    except BaseException as exc:  # reported to the parent, which raises it
        events.put(("error", type(exc).__name__, str(exc)))


def _shares(files: list[Path], n: int) -> list[list[str]]:
    """Split files into ``n`` shares of about equal bytes (largest first, greedy)."""
    shares: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for f in sorted(files, key=lambda f: -f.stat().st_size):
        i = load.index(min(load))
        shares[i].append(str(f))
        load[i] += f.stat().st_size
    return [s for s in shares if s]


def _merge_share(totals: dict[str, np.ndarray], rows: dict[str, int], prefix: str) -> None:
    """Add one worker's totals file into ``totals``, ``MERGE_ROWS`` at a time (the first becomes them)."""
    for name, n in rows.items():
        path = f"{prefix}.{name}.u32"
        if name not in totals:
            totals[name] = np.fromfile(path, dtype=COUNT_DTYPE)
            if totals[name].size != n:
                raise EngramStoreError(f"{path}: a counting process wrote {totals[name].size} rows, expected {n}")
        else:
            buf = np.empty(min(n, MERGE_ROWS), dtype=COUNT_DTYPE)
            with open(path, "rb") as f:
                for a in range(0, n, MERGE_ROWS):
                    b = min(n, a + MERGE_ROWS)
                    view = buf[:b - a]
                    if f.readinto(memoryview(view).cast("B")) != view.nbytes:
                        raise EngramStoreError(f"{path} is short: a counting process wrote less than {n} rows")
                    add_counts(totals[name][a:b], view, name, a)
        os.unlink(path)


def _worker_error(name: str, message: str) -> EngramStoreError:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, EngramStoreError):
        return cls(message)
    return EngramStoreError(f"counting failed: {name}: {message}")


def count_corpus(checkpoint, corpus: Sequence[str | os.PathLike], *, workers: int | None = None,
                 progress: bool = True, hash_rows: bool = True, scratch: str | os.PathLike | None = None,
                 ) -> tuple[Counts, dict]:
    """Count row accesses of every Engram table of ``checkpoint`` (a path, see ``count_source``, or a
    CountSource) over ``corpus``.

    Uses ``workers`` processes (default: both cores); worker totals pass through ``scratch`` (default: the
    system's temporary folder). Binary or undecodable files are skipped and reported. Returns the counts
    and a report: tokens, files, skipped, seconds, tokens_per_s, rows_counted, rows_per_s, cpu_seconds per
    phase, hash_overhead, and peak_rss (bytes: the parent, each worker, and their sum; see the module
    docstring). ``hash_rows=False`` only tokenizes: the baseline the counting overhead is measured against.
    """
    import tempfile

    import psutil
    from tqdm import tqdm

    files = expand_corpus(corpus)
    if not files:
        raise EngramStoreError(f"the corpus {[str(c) for c in corpus]} holds no files")
    source = count_source(checkpoint)
    shares = _shares(files, workers or min(2, os.cpu_count() or 1))
    ctx = mp.get_context("spawn")  # no fork: torch and tokenizers hold threads
    events = ctx.Queue()
    me = psutil.Process()
    start = time.perf_counter()
    n_tokens = 0
    skipped: list[tuple[str, str]] = []
    work = {"total": 0.0, "tokenize": 0.0, "hash_count": 0.0}
    worker_rss: list[int] = []
    parent_rss = me.memory_info().rss
    totals: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="engram-count-", dir=scratch) as tmp:
        import pickle

        source_file = os.path.join(tmp, "source.pickle")
        with open(source_file, "wb") as f:
            pickle.dump(source, f)
        prefixes = [os.path.join(tmp, f"share{i}") for i in range(len(shares))]
        procs = [ctx.Process(target=_worker_main, args=(source_file, share, hash_rows, prefix, events), daemon=True)
                 for share, prefix in zip(shares, prefixes)]
        for p in procs:
            p.start()
        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                   desc="count", disable=None if progress else True)
        try:
            running = len(procs)
            while running:
                try:
                    kind, a, b = events.get(timeout=5)
                except Exception:  # queue.Empty: check nobody died silently (OOM kill)
                    if any(p.exitcode not in (None, 0) for p in procs):
                        raise EngramStoreError("a counting process died (out of memory?); try --workers 1")
                    continue
                if kind == "progress":
                    n_tokens += b
                    bar.update(a)
                    bar.set_postfix(tokens=f"{n_tokens:,}")
                elif kind == "skipped":
                    skipped.append((a, b))
                    bar.update(os.path.getsize(a))
                elif kind == "done":
                    running -= 1
                    worker_rss.append(int(b.pop("max_rss")))
                    for k, v in b.items():  # summed over workers: CPU-seconds per phase
                        work[k] += v
                else:
                    raise _worker_error(a, b)
            parent_rss = max(parent_rss, me.memory_info().rss)
        finally:
            bar.close()
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
        if len(skipped) == len(files):
            raise EngramStoreError(f"all {len(files)} corpus files were skipped as binary or not UTF-8 (first: "
                                   f"{skipped[0][0]}: {skipped[0][1]}): give text files")
        if n_tokens == 0:
            raise EngramStoreError(f"the corpus {[str(c) for c in corpus]} holds no tokens (empty files?)")
        if hash_rows:
            for prefix in prefixes:
                _merge_share(totals, source.rows, prefix)
        else:  # the tokenize-only baseline: untouched zero pages cost no memory
            totals = {name: np.zeros(n, dtype=COUNT_DTYPE) for name, n in source.rows.items()}
        parent_rss = max(parent_rss, me.memory_info().rss)
    seconds = time.perf_counter() - start
    counted = len(files) - len(skipped)
    counts = Counts(source.fingerprint, totals, source.hash_config, source.dims, n_tokens, counted, source.row_format)
    heads = (source.hash_config["max_ngram"] - 1) * source.hash_config["heads"]
    rows_counted = n_tokens * heads * len(source.rows) if hash_rows else 0
    report = {"tokens": n_tokens, "files": counted, "skipped": len(skipped),
              "skipped_files": [list(s) for s in sorted(skipped)[:SKIPPED_SHOWN]],
              "seconds": seconds, "tokens_per_s": n_tokens / seconds,
              "rows_counted": rows_counted, "rows_per_s": rows_counted / seconds,
              "table_rows": dict(source.rows), "cpu_seconds": work,
              "hash_overhead": work["hash_count"] / max(work["tokenize"], 1e-9),
              "peak_rss": {"parent": parent_rss, "workers": worker_rss, "sum": parent_rss + sum(worker_rss)}}
    return counts, report
