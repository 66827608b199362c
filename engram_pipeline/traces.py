"""Access traces for the hit-rate simulator, in the shape the model issues them.

A trace is the sequence of prefetches the model makes: per forward step (a batch of B
sequences of T tokens) one prefetch per Engram layer of all that batch's row ids
``[B, T, K]`` (K = every head of every N-gram order). The store dedupes each prefetch, so a
:class:`Trace` keeps each request's *unique* row ids (sorted) and how many ids were issued.

Two sources:

- :func:`zipf_trace`: synthetic text whose 2-grams and 3-grams are drawn i.i.d. from a Zipf
  law over a vocabulary of N-grams, hashed per head into per-head blocks of a table
  (so heads collide like the real hash does). Training counts come from an independent
  draw of the same law (a "training corpus").
- :func:`text_trace`: real text through a checkpoint's own tokenizer, compression and hash
  config; counts from one part of the corpus, the trace from another (held out).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from engram_store.errors import EngramStoreError, FingerprintMismatchError


@dataclass
class Trace:
    """Prefetch requests in issue order, each ``(table, unique sorted row ids)``."""

    name: str
    rows: dict[str, int]  # table name -> rows of the table
    requests: list[tuple[str, np.ndarray]]  # (table, unique int64 ids, sorted), in issue order
    issued: int = 0  # ids issued before each request's dedupe (B*T*K per request)
    counts: dict[str, np.ndarray] | None = None  # training access counts per id (for ranks)
    fingerprint: str | None = None  # hash-config fingerprint the row ids were made under
    meta: dict = field(default_factory=dict)
    # A trace of a huge table may number only the rows it touches (in row order): ids are then
    # in [0, id_space[table]), ``rows`` stays the table's size (capacities are fractions of it) and
    # ``ranks`` gives each id's frequency rank in the whole table (zero-count rows rank by row id).
    id_space: dict[str, int] | None = None
    ranks: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not self.requests:
            raise EngramStoreError(f"trace {self.name!r} is empty: it holds no prefetch requests; "
                                   "give more text (or more steps)")
        for table, ids in self.requests:
            if table not in self.rows:
                raise EngramStoreError(f"trace {self.name!r} names table {table!r} with no row count")
            n = self.n_ids(table)
            if ids.size and (ids[0] < 0 or ids[-1] >= n):
                raise EngramStoreError(f"trace {self.name!r}: row ids of {table!r} outside [0, {n})")
        if self.counts is not None:
            self.counts = check_counts(self, self.counts)
        if self.ranks is not None:
            for table in self.rows:
                if np.shape(self.ranks.get(table)) != (self.n_ids(table),):
                    raise EngramStoreError(f"trace {self.name!r}: ranks of {table!r} must give one rank per id "
                                           f"({self.n_ids(table)})")

    def n_ids(self, table: str) -> int:
        """Size of the id space of ``table``'s requests (the table's rows unless compacted)."""
        return int(self.rows[table] if self.id_space is None else self.id_space[table])

    def rank(self, table: str) -> np.ndarray:
        """Frequency rank (0 = hottest) of each id in the whole table, by training counts."""
        if self.ranks is not None:
            return self.ranks[table]
        if self.counts is None:
            raise EngramStoreError(f"trace {self.name!r} has no training counts to rank rows by: give a counts file "
                                   "made with the trace's checkpoint")
        return ranks_from_counts(self.counts[table])

    @property
    def accesses(self) -> int:
        """Unique-per-request accesses (what the store's hit counters count)."""
        return int(sum(ids.size for _, ids in self.requests))

    def table_requests(self, table: str) -> list[np.ndarray]:
        return [ids for t, ids in self.requests if t == table]

    def with_counts(self, counts, fingerprint: str | None = None) -> Trace:
        """This trace with training counts from a ``Counts`` object or a ``{table: array}`` dict."""
        tables = getattr(counts, "tables", counts)
        fp = getattr(counts, "fingerprint", fingerprint)
        if fp is not None and self.fingerprint is not None and fp != self.fingerprint:
            raise FingerprintMismatchError(
                f"counts were made for hash config {str(fp)[:12]}…, but trace {self.name!r} was hashed with "
                f"{self.fingerprint[:12]}…: count the corpus again with the trace's checkpoint")
        return Trace(self.name, self.rows, self.requests, self.issued, dict(tables), self.fingerprint, dict(self.meta),
                     self.id_space, None)


def check_counts(trace: Trace, counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for table in trace.rows:
        rows = trace.n_ids(table)
        if table not in counts:
            raise FingerprintMismatchError(
                f"counts hold no table {table!r} (they hold {sorted(counts)}): they were made for a different "
                "hash config; count the corpus again with the trace's checkpoint")
        c = np.asarray(counts[table])
        if c.shape != (rows,):
            raise FingerprintMismatchError(
                f"counts of {table!r} have {c.shape[0] if c.ndim == 1 else c.shape} rows but the trace's table has "
                f"{rows}: they were made for a different hash config; count again with the trace's checkpoint")
        out[table] = c.astype(np.int64, copy=False)
    return out


def ranks_from_counts(counts: np.ndarray) -> np.ndarray:
    """``rank[row]``: position in descending-count order, ties by row id (the store's layout)."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size, dtype=np.int64)
    return rank


def _requests_from_batch(rows_by_table: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, int]]:
    return [(t, np.unique(np.asarray(r).reshape(-1)).astype(np.int64), int(np.asarray(r).size))
            for t, r in rows_by_table.items()]


# -- synthetic Zipf --------------------------------------------------------------------------

def _zipf_sampler(n_items: int, exponent: float, rng: np.random.Generator):
    """Draws item ids in [0, n_items) with P(i) ∝ (rank+1)^-exponent under a random rank shuffle."""
    w = np.arange(1, n_items + 1, dtype=np.float64) ** -float(exponent)
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    shuffle = rng.permutation(n_items)  # popular items are not the small ids

    def draw(size, r: np.random.Generator):
        return shuffle[np.minimum(np.searchsorted(cdf, r.random(size)), n_items - 1)]

    return draw


def zipf_trace(exponent: float, *, rows: int = 200_000, heads: int = 8, max_ngram: int = 3,
               layers: Sequence[int] = (1,), batch: int = 4, seq_len: int = 128, steps: int = 100,
               train_tokens: int = 400_000, vocab_factor: int = 4, seed: int = 0) -> Trace:
    """Synthetic trace: each token draws one N-gram per order from Zipf(``exponent``).

    Every table has ``rows`` rows split into ``(max_ngram-1)*heads`` per-head blocks; head h
    maps an N-gram to ``offset_h + hash_h(ngram) % block_h``. The N-gram vocabulary has
    ``vocab_factor * rows`` items per order. Counts come from ``train_tokens`` tokens drawn
    independently. ``steps`` forward steps of ``batch x seq_len`` tokens, one request per layer.
    """
    if exponent <= 0:
        raise EngramStoreError(f"Zipf exponent must be > 0, got {exponent}")
    if steps < 1 or batch < 1 or seq_len < 1:
        raise EngramStoreError(f"an empty trace: steps={steps}, batch={batch}, seq_len={seq_len} must all be >= 1")
    orders = max_ngram - 1
    k = orders * heads
    if rows < k:
        raise EngramStoreError(f"rows={rows} is smaller than the {k} head blocks")
    rng = np.random.default_rng(seed)
    n_items = vocab_factor * rows
    draws = [_zipf_sampler(n_items, exponent, rng) for _ in range(orders)]
    block = np.full(k, rows // k, dtype=np.int64)
    block[: rows % k] += 1
    offsets = np.concatenate([[0], np.cumsum(block)[:-1]])
    tables = {f"layer{L}": rows for L in layers}
    # Per layer and head: a multiplicative hash with its own odd multiplier and salt.
    mult = {L: rng.integers(1, 2**31, size=k) * 2 + 1 for L in layers}
    salt = {L: rng.integers(0, 2**31, size=k) for L in layers}

    def rows_of(items: list[np.ndarray], layer: int) -> np.ndarray:  # items: per order, shape S
        cols = []
        for h in range(k):
            it = items[h // heads].astype(np.uint64)
            hv = (it * np.uint64(mult[layer][h]) + np.uint64(salt[layer][h])) >> np.uint64(7)
            cols.append(offsets[h] + (hv % np.uint64(block[h])).astype(np.int64))
        return np.stack(cols, axis=-1)  # (*S, K)

    train_rng = np.random.default_rng([seed, 1])
    train_items = [d(train_tokens, train_rng) for d in draws]
    counts = {f"layer{L}": np.bincount(rows_of(train_items, L).reshape(-1), minlength=rows).astype(np.int64)
              for L in layers}
    test_rng = np.random.default_rng([seed, 2])
    requests, issued = [], 0
    for _ in range(steps):
        items = [d((batch, seq_len), test_rng) for d in draws]
        for L in layers:
            r = rows_of(items, L)  # (B, T, K)
            issued += r.size
            requests.append((f"layer{L}", np.unique(r).astype(np.int64)))
    return Trace(f"zipf{exponent:g}", tables, requests, issued, counts, None,
                 {"source": "zipf", "exponent": exponent, "batch": batch, "seq_len": seq_len, "steps": steps,
                  "heads": heads, "max_ngram": max_ngram, "train_tokens": train_tokens, "seed": seed})


def trace_from_arrays(name: str, rows: dict[str, int], batches: Iterable[dict[str, np.ndarray]],
                      counts: dict[str, np.ndarray] | None = None, fingerprint: str | None = None,
                      meta: dict | None = None) -> Trace:
    """A trace from per-step ``{table: row ids [B, T, K]}`` (one request per table per step)."""
    requests, issued = [], 0
    for batch in batches:
        for table, ids, n in _requests_from_batch(batch):
            requests.append((table, ids))
            issued += n
    return Trace(name, dict(rows), requests, issued, counts, fingerprint, dict(meta or {}))


# -- real text through a checkpoint ----------------------------------------------------------

def _token_chunks(ckpt, texts: Iterable[str], seq_len: int, max_tokens: int | None):
    """Compressed token ids of the texts, cut into ``seq_len`` pieces (a text's tail kept if >= 3 tokens)."""
    buf: list[str] = []
    total = 0

    def flush():
        nonlocal total
        out = []
        for enc in ckpt.tokenizer.encode_batch(buf):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if ids.size == 0:
                continue
            comp = np.asarray(ckpt.compression.compress(ids), dtype=np.int64)
            for s in range(0, comp.size, seq_len):
                piece = comp[s : s + seq_len]
                if piece.size == seq_len:
                    out.append(piece)
            total += ids.size
        buf.clear()
        return out

    for text in texts:
        buf.append(text)
        if len(buf) >= 64:
            yield from flush()
            if max_tokens is not None and total >= max_tokens:
                return
    if buf:
        yield from flush()


def _hash_batches(ckpt, chunks, batch: int, order: str = "in-order", seed: int = 0):
    """Batches of ``batch`` sequences hashed to ``{table: row ids [B, T, K]}``.

    ``in-order``: consecutive pieces fill a batch. ``streams``: B streams, each reading its own
    contiguous part of the text (like serving B documents side by side; step s takes the s-th
    piece of every part). ``shuffled``: pieces in a random order (a shuffling data loader).
    """
    import torch

    if order == "in-order":
        seqs = chunks
    else:
        chunks = list(chunks)
        n = len(chunks) // batch * batch
        if order == "streams":
            per = n // batch
            seqs = (chunks[b * per + s] for s in range(per) for b in range(batch))
        elif order == "shuffled":
            seqs = (chunks[i] for i in np.random.default_rng(seed).permutation(len(chunks))[:n])
        else:
            raise EngramStoreError(f"unknown trace order {order!r}: use in-order, streams or shuffled")
    pending: list[np.ndarray] = []
    for c in seqs:
        pending.append(c)
        if len(pending) == batch:
            ids = torch.from_numpy(np.stack(pending))
            pending = []
            yield {f"layer{L}": r.numpy() for L, r in ckpt.hasher.row_ids(ids).items()}


class _RowCounter:
    """Per-table access counts of hashed training batches, without a pass over the table per batch.

    Ids are buffered and counted in chunks of ``chunk`` ids: dense (one ``bincount`` per chunk)
    for tables that fit comfortably in memory, sparse (sorted distinct rows and their counts, merged
    per chunk) for huge ones such as V4.1's 384 M-row tables, whose dense int64 counts alone would
    take 3 GB each.
    """

    def __init__(self, rows: dict[str, int], sparse: bool, chunk: int = 1 << 24) -> None:
        self.rows, self.sparse, self.chunk = rows, sparse, chunk
        self._buf: dict[str, list[np.ndarray]] = {t: [] for t in rows}
        self._n = dict.fromkeys(rows, 0)
        self.dense = None if sparse else {t: np.zeros(n, dtype=np.int64) for t, n in rows.items()}
        self.keys = {t: np.empty(0, np.int64) for t in rows}
        self.counts = {t: np.empty(0, np.int64) for t in rows}
        self.total = 0

    def add(self, table: str, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._buf[table].append(ids)
        self._n[table] += ids.size
        self.total += ids.size
        if self._n[table] >= self.chunk:
            self._flush(table)

    def _flush(self, table: str) -> None:
        if not self._buf[table]:
            return
        ids = np.concatenate(self._buf[table])
        self._buf[table], self._n[table] = [], 0
        if not self.sparse:
            self.dense[table] += np.bincount(ids, minlength=self.rows[table])
            return
        k, c = np.unique(ids, return_counts=True)
        if self.keys[table].size:
            k, inv = np.unique(np.concatenate([self.keys[table], k]), return_inverse=True)
            c = np.bincount(inv, weights=np.concatenate([self.counts[table], c]), minlength=k.size).astype(np.int64)
        self.keys[table], self.counts[table] = k, c.astype(np.int64)

    def finish(self) -> None:
        for t in self.rows:
            self._flush(t)


def _compact(requests: list[tuple[str, np.ndarray]], counter: _RowCounter):
    """Renumber each table's trace ids to the rows the trace touches (in row order), with each one's
    training count and its frequency rank in the whole table (zero-count rows rank by row id)."""
    id_space, counts, ranks, out = {}, {}, {}, []
    universe = {}
    for t in counter.rows:
        reqs = [ids for tt, ids in requests if tt == t]
        u = np.unique(np.concatenate(reqs)) if reqs else np.empty(0, np.int64)
        ck, cc = counter.keys[t], counter.counts[t]
        by_rank = np.lexsort((ck, -cc))  # counted rows: most counts first, ties by row id
        rank_counted = np.empty(ck.size, dtype=np.int64)
        rank_counted[by_rank] = np.arange(ck.size, dtype=np.int64)
        i = np.searchsorted(ck, u)  # counted rows below each trace row
        j = np.minimum(i, max(ck.size - 1, 0))
        hit = (i < ck.size) & (ck[j] == u) if ck.size else np.zeros(u.size, dtype=bool)
        # a zero-count row ranks after every counted row, among the zero-count rows by row id
        ranks[t] = np.where(hit, rank_counted[j] if ck.size else 0, ck.size + (u - i)).astype(np.int64)
        counts[t] = np.where(hit, cc[j] if ck.size else 0, 0).astype(np.int64)
        id_space[t] = int(u.size)
        universe[t] = u
    for t, ids in requests:
        out.append((t, np.searchsorted(universe[t], ids).astype(np.int64)))
    return out, id_space, counts, ranks


def hashed_text_trace(source, files: Sequence, corpus_name: str, *, held_out_fraction: float = 0.1, batch: int = 8,
                      seq_len: int = 256, max_tokens: int | None = 400_000, max_train_tokens: int | None = None,
                      counts=None, order: str = "streams", seed: int = 0, compact: bool = False,
                      name: str | None = None, meta: dict | None = None) -> Trace:
    """Held-out trace of ``files`` through ``source``'s tokenizer, compression and hash config.

    ``source`` has ``tokenizer`` (``tokenizers.Tokenizer``), ``compression``, ``hasher``
    (``NgramHasher``) and ``fingerprint`` (a loaded checkpoint has them). Files are split by path
    hash (``engram_model.corpus.split_files``); the held-out part (at most about ``max_tokens``
    tokens) becomes the trace, per-row counts come from the training part (at most about
    ``max_train_tokens`` tokens) hashed the same way, counted in chunks (:class:`_RowCounter`),
    or from ``counts`` (a ``Counts`` object or ``{table: array}``). ``compact``: number each
    table's ids by the rows the trace touches (for tables too large for per-row arrays; see
    :class:`Trace`). ``order``: how held-out pieces of ``seq_len`` tokens form batches.
    """
    from engram_model.corpus import iter_texts, split_files

    if not files:
        raise EngramStoreError(f"corpus {corpus_name} holds no files: name files or folders of text")
    train_files, held_files = split_files(files, held_out_fraction)
    if not held_files:
        raise EngramStoreError(f"corpus {corpus_name}: the held-out split is empty ({len(files)} files); "
                               "give more files or a larger held-out fraction")
    layers = list(source.hasher.config.layer_ids)
    rows = {f"layer{L}": int(source.hasher.table_rows[L]) for L in layers}
    batches = _hash_batches(source, _token_chunks(source, iter_texts(held_files), seq_len, max_tokens), batch,
                            order, seed)
    requests, issued = [], 0
    for b in batches:
        for table, ids, n in _requests_from_batch(b):
            requests.append((table, ids))
            issued += n
    if not requests:
        raise EngramStoreError(f"the held-out part of {corpus_name} gives an empty trace (fewer than "
                               f"{batch} sequences of {seq_len} tokens): give more text or smaller --batch/--seq-len")
    counter = _RowCounter(rows, sparse=compact)
    if counts is None:
        for b in _hash_batches(source, _token_chunks(source, iter_texts(train_files), seq_len, max_train_tokens), 64):
            for t, r in b.items():
                counter.add(t, r)
        counter.finish()
        counts_fp = source.fingerprint
        train_accesses = counter.total
    else:
        tables = dict(getattr(counts, "tables", counts))
        counts_fp = getattr(counts, "fingerprint", source.fingerprint)
        train_accesses = int(sum(int(np.asarray(c).sum()) for c in tables.values()))
        if compact:
            for t, c in tables.items():
                c = np.asarray(c)
                counter.keys[t] = np.flatnonzero(c)
                counter.counts[t] = c[counter.keys[t]].astype(np.int64)
        else:
            counter.dense = tables
    if counts_fp != source.fingerprint:
        raise FingerprintMismatchError(
            f"counts were made for hash config {counts_fp[:12]}…, but {corpus_name}'s trace is hashed with "
            f"{source.fingerprint[:12]}…: count the corpus again with this checkpoint")
    id_space = ranks = None
    if compact:
        requests, id_space, tables, ranks = _compact(requests, counter)
    else:
        tables = counter.dense
    meta = {"source": "text", "corpus": corpus_name, "held_out_fraction": held_out_fraction,
            "train_files": len(train_files), "held_out_files": len(held_files), "batch": batch, "seq_len": seq_len,
            "order": order, "steps": len(requests) // max(1, len(layers)), "train_accesses": train_accesses,
            **(meta or {})}
    return Trace(name or f"text:{corpus_name}", rows, requests, issued, tables, source.fingerprint, meta,
                 id_space, ranks)


def text_trace(checkpoint: str | os.PathLike, corpus: Sequence[str | os.PathLike] | None = None, *,
               held_out_fraction: float = 0.1, batch: int = 8, seq_len: int = 256,
               max_tokens: int | None = 400_000, max_train_tokens: int | None = None, counts=None,
               order: str = "streams", seed: int = 0) -> Trace:
    """Held-out real-text trace through ``checkpoint``'s own hash config (:func:`hashed_text_trace`).

    Corpus: files and folders, or by default this Python's standard library.
    """
    from engram_model.checkpoint import load_checkpoint
    from engram_model.corpus import stdlib_files

    ckpt = load_checkpoint(checkpoint)
    if corpus:
        from engram_pipeline.counts import expand_corpus

        files = expand_corpus(corpus)
        corpus_name = ",".join(str(p) for p in corpus)
    else:
        files = stdlib_files()
        corpus_name = "stdlib"
    return hashed_text_trace(ckpt, files, corpus_name, held_out_fraction=held_out_fraction, batch=batch,
                             seq_len=seq_len, max_tokens=max_tokens, max_train_tokens=max_train_tokens, counts=counts,
                             order=order, seed=seed, meta={"checkpoint": str(checkpoint)})
