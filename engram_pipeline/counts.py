"""Exact per-row access counts of every Engram table over a corpus.

The build tool ranks rows by these counts (frequency-ordered layout, DESIGN.md). Counting
goes through the checkpoint's own tokenizer, compression and hash config, so the counts
address exactly the rows the model will ask for. Each file is one sequence: the N-gram
row of position t depends only on tokens t-max_ngram+1..t, so this matches the model's
accesses except at the few left-padded positions where a window starts.

A counts file is an ``.npz``: one int64 array per table (``layer{L}``) and ``__meta__``, a
JSON string holding the fingerprint, the hash config, table dims and the token count.
Counts files with the same fingerprint merge exactly (element-wise sums).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engram_store.errors import EngramStoreError, FingerprintMismatchError, StoreCorruptError, StoreNotFoundError
from engram_model.memory import table_name

FORMAT = "engram-counts/1"


@dataclass
class Counts:
    """Access counts per table (``tables[name][row]``) under one hash-config fingerprint."""

    fingerprint: str
    tables: dict[str, np.ndarray]
    hash_config: dict = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    files: int = 0

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (``*.partial`` then rename) so a crash never leaves half a file."""
        path = Path(path)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "hash_config": self.hash_config,
                "dims": self.dims, "tokens": self.tokens, "files": self.files}
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
                tables = {k: z[k].astype(np.int64, copy=False) for k in z.files if k != "__meta__"}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise StoreCorruptError(f"{path} is not a readable counts file ({exc}); count the corpus again") from exc
        if meta.get("format") != FORMAT:
            raise StoreCorruptError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(meta["fingerprint"], tables, meta.get("hash_config", {}), meta.get("dims", {}),
                   int(meta.get("tokens", 0)), int(meta.get("files", 0)))

    def check_fingerprint(self, fingerprint: str, what: str = "the checkpoint") -> None:
        if self.fingerprint != fingerprint:
            raise FingerprintMismatchError(
                f"counts were made for hash config {self.fingerprint[:12]}…, but {what} has "
                f"{fingerprint[:12]}…: count the corpus again with that checkpoint"
            )

    def order(self, table: str) -> np.ndarray:
        """Row ids by descending count (ties by row id): ``order[rank] = row``."""
        return np.argsort(-self.tables[table], kind="stable")


def merge(counts: Sequence[Counts]) -> Counts:
    """Exact sum of counts files made under one fingerprint (corpora counted apart)."""
    if not counts:
        raise EngramStoreError("nothing to merge: give at least one counts file")
    first = counts[0]
    total = {k: v.copy() for k, v in first.tables.items()}
    for other in counts[1:]:
        other.check_fingerprint(first.fingerprint, "the first counts file")
        if set(other.tables) != set(total) or any(other.tables[k].shape != v.shape for k, v in total.items()):
            raise FingerprintMismatchError("counts files hold different tables or table sizes; they cannot be merged")
        for k in total:
            total[k] += other.tables[k]
    return Counts(first.fingerprint, total, first.hash_config, first.dims,
                  sum(c.tokens for c in counts), sum(c.files for c in counts))


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
    """Per-process state: the checkpoint's tokenizer, compression and hasher."""

    def __init__(self, checkpoint: str) -> None:
        from engram_model.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        self.tokenizer = ckpt.tokenizer
        self.compression = ckpt.compression
        self.hasher = ckpt.hasher
        self.rows = {layer: int(self.hasher.table_rows[layer]) for layer in ckpt.hash_config.layer_ids}

    def token_ids(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(texts)]

    def zeros(self) -> dict[str, np.ndarray]:
        """Empty totals, one int64 array per table."""
        return {table_name(layer): np.zeros(n, dtype=np.int64) for layer, n in self.rows.items()}

    def count(self, texts: list[str], totals: dict[str, np.ndarray], hash_rows: bool = True) -> tuple[int, dict]:
        """Add the row accesses of ``texts`` into ``totals`` (in place, so a small file costs no pass over
        the tables); return their token count and seconds spent tokenizing vs hashing+counting."""
        import torch

        t0 = time.perf_counter()
        encoded = self.token_ids(texts)
        t1 = time.perf_counter()
        n_tokens = 0
        for ids in encoded:
            n_tokens += ids.size
            if not hash_rows or ids.size == 0:
                continue
            compressed = torch.from_numpy(np.asarray(self.compression.compress(ids), dtype=np.int64))[None]
            for layer, rows in self.hasher.row_ids(compressed).items():
                _accumulate(totals[table_name(layer)], rows.reshape(-1).numpy())
        return n_tokens, {"tokenize": t1 - t0, "hash_count": time.perf_counter() - t1}


def _accumulate(total: np.ndarray, rows: np.ndarray) -> None:
    """``total[r] += multiplicity of r in rows``: dense bincount for big batches, sparse for small ones
    (a file of a few thousand tokens must not cost a pass over a 20M-row table)."""
    if rows.size * 8 >= total.size:
        total += np.bincount(rows, minlength=total.size)
    else:
        u, c = np.unique(rows, return_counts=True)
        total[u] += c


def _worker_main(checkpoint: str, files: list[str], hash_rows: bool, out_path: str, events) -> None:
    """One process: count its share of files, report progress per file, save totals to ``out_path``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        from engram_model.corpus import iter_texts

        torch.set_num_threads(1)  # one process per core does the parallelism
        counter = _Counter(checkpoint)
        totals = counter.zeros()
        n_tokens = 0
        # Seconds spent on the files themselves (no start-up), split by phase, for throughput figures.
        work = {"total": 0.0, "tokenize": 0.0, "hash_count": 0.0}
        for path in files:
            t = time.perf_counter()
            tokens, phases = counter.count(list(iter_texts([path])), totals, hash_rows)
            work["total"] += time.perf_counter() - t
            for k, v in phases.items():
                work[k] += v
            n_tokens += tokens
            events.put(("progress", os.path.getsize(path), tokens))
        # Totals go through a file, not the pipe: a table can be hundreds of MB.
        np.savez(out_path, **totals)
        events.put(("done", n_tokens, work))
    except BaseException as exc:  # reported to the parent, which raises it
        events.put(("error", f"{type(exc).__name__}: {exc}", None))


def _shares(files: list[Path], n: int) -> list[list[str]]:
    """Split files into ``n`` shares of about equal bytes (largest first, greedy)."""
    shares: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for f in sorted(files, key=lambda f: -f.stat().st_size):
        i = load.index(min(load))
        shares[i].append(str(f))
        load[i] += f.stat().st_size
    return [s for s in shares if s]


def count_corpus(checkpoint: str | os.PathLike, corpus: Sequence[str | os.PathLike], *,
                 workers: int | None = None, progress: bool = True, hash_rows: bool = True) -> tuple[Counts, dict]:
    """Count row accesses of every Engram table of ``checkpoint`` over ``corpus``.

    Uses ``workers`` processes (default: both cores). Returns the counts and a report
    ``{"tokens", "files", "seconds", "tokens_per_s"}``. ``hash_rows=False`` only tokenizes:
    the baseline the counting overhead is measured against.
    """
    import tempfile

    from tqdm import tqdm

    from engram_model.checkpoint import load_checkpoint

    files = expand_corpus(corpus)
    if not files:
        raise EngramStoreError(f"the corpus {[str(c) for c in corpus]} holds no files")
    ckpt = load_checkpoint(checkpoint)
    dims = {name: int(t.shape[1]) for name, t in ckpt.engram_tables().items()}
    rows = {table_name(layer): int(ckpt.hasher.table_rows[layer]) for layer in ckpt.hash_config.layer_ids}
    totals = {name: np.zeros(n, dtype=np.int64) for name, n in rows.items()}
    shares = _shares(files, workers or min(2, os.cpu_count() or 1))
    ctx = mp.get_context("spawn")  # no fork: torch and tokenizers hold threads
    events = ctx.Queue()
    start = time.perf_counter()
    n_tokens = 0
    work = {"total": 0.0, "tokenize": 0.0, "hash_count": 0.0}
    with tempfile.TemporaryDirectory(prefix="engram-count-") as tmp:
        outs = [os.path.join(tmp, f"share{i}.npz") for i in range(len(shares))]
        procs = [ctx.Process(target=_worker_main, args=(str(checkpoint), share, hash_rows, out, events), daemon=True)
                 for share, out in zip(shares, outs)]
        for p in procs:
            p.start()
        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                   desc="count", disable=not progress)
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
                    bar.update(a)
                    bar.set_postfix(tokens=f"{n_tokens:,}")
                    n_tokens += b
                elif kind == "done":
                    running -= 1
                    for k, v in b.items():  # summed over workers: CPU-seconds per phase
                        work[k] += v
                else:
                    raise EngramStoreError(f"counting failed: {a}")
        finally:
            bar.close()
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
        for out in outs:
            with np.load(out) as z:
                for k in totals:
                    totals[k] += z[k]
    seconds = time.perf_counter() - start
    if n_tokens == 0:
        raise EngramStoreError(f"the corpus {[str(c) for c in corpus]} holds no tokens (empty files?)")
    counts = Counts(ckpt.fingerprint, totals, ckpt.hash_config.to_dict(), dims, n_tokens, len(files))
    report = {"tokens": n_tokens, "files": len(files), "seconds": seconds, "tokens_per_s": n_tokens / seconds,
              "cpu_seconds": work, "hash_overhead": work["hash_count"] / max(work["tokenize"], 1e-9)}
    return counts, report
