"""Building stores: from a checkpoint and counts, from synthetic rows, and converting between forms.

Every path here writes through :class:`engram_store.StoreWriter`, so a crash leaves any
earlier store whole and no partial store behind.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from engram_pipeline.counts import Counts
from engram_store.errors import EngramStoreError, InvalidValuesError, StoreExistsError, StoreNotFoundError
from engram_store.format import DTYPE_NAMES, DTYPES, read_manifest
from engram_pipeline.plan import DTYPE_BYTES, TablePlan, make_plan
from engram_store.store import TieredStore
from engram_store.writer import StoreWriter
from engram_model.hashing import NgramHasher
from engram_model.memory import table_name

_CHUNK_BYTES = 64 << 20


def tier_plan_manifest(plan: dict[str, TablePlan], hbm_bytes: int, dram_bytes: int) -> dict:
    """The plan as the store's ``tier_plan``: per-table fractions of the budgets (what ``open`` reads)
    and the planned rows and expected hit rates (what ``inspect`` shows)."""

    def fraction(used: int, budget: int) -> float:
        # Rounded up by one ulp so open()'s int(budget * fraction) never loses a row to rounding.
        return float(np.nextafter(used / budget, np.inf)) if budget else 0.0

    tables = {}
    for name, p in plan.items():
        tables[name] = {
            "hbm_fraction": fraction(p.hbm_rows * p.row_bytes, hbm_bytes),
            "dram_fraction": fraction(p.dram_rows * p.row_bytes, dram_bytes),
            "hbm_rows": p.hbm_rows, "dram_rows": p.dram_rows,
            "expected_hit": {"hbm": p.hbm_hit, "dram": p.dram_hit, "disk": p.disk_hit},
            "zipf_exponent": p.zipf_exponent,
        }
    return {"hbm_bytes": int(hbm_bytes), "dram_bytes": int(dram_bytes), "tables": tables}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise StoreExistsError(f"{out} exists: pass --overwrite (overwrite=True) to replace it")


def build_from_checkpoint(checkpoint, counts: Counts | str | os.PathLike | None, out, *, hbm_bytes: int, dram_bytes: int,
                          backend: str = "mmap", dtype: str | None = None, overwrite: bool = False,
                          shards: int = 1, owner: str = "row_mod_n", progress: bool = True) -> dict:
    """Rows of the checkpoint's Engram tables in frequency-rank order, with remap arrays and tier plan.

    ``dtype`` casts the rows (default: the checkpoint's). ``shards > 1`` writes one store per
    rank (see :mod:`engram_store.sharded`) with owner function ``owner`` ("row_mod_n", or
    "head_ranges": whole hash heads per rank, sizes from the checkpoint's hash config). A Hugging
    Face V4.1-style checkpoint directory goes to :func:`build_from_hf` (``counts`` optional there).
    Returns a report (tables, bytes, seconds, MB/s).
    """
    from engram_model.checkpoint import load_checkpoint
    from engram_pipeline.hf_checkpoint import is_hf_checkpoint

    out = Path(out)
    _check_out(out, overwrite)
    if is_hf_checkpoint(checkpoint):
        if dtype is not None:
            raise EngramStoreError("--dtype does not apply to a Hugging Face checkpoint: its rows are stored as "
                                   "the checkpoint's own fp8 bytes; drop --dtype")
        return build_from_hf(checkpoint, counts, out, hbm_bytes=hbm_bytes, dram_bytes=dram_bytes, backend=backend,
                             overwrite=overwrite, shards=shards, owner=owner, progress=progress)
    if counts is None:
        raise EngramStoreError("building from our own checkpoint needs --counts (engram-store count)")
    ckpt = load_checkpoint(checkpoint)
    counts = counts if isinstance(counts, Counts) else Counts.load(counts)
    counts.check_fingerprint(ckpt.fingerprint)
    tables = ckpt.engram_tables()
    if set(tables) != set(counts.tables) or any(counts.tables[n].size != t.shape[0] for n, t in tables.items()):
        raise EngramStoreError("counts file tables do not match the checkpoint's Engram tables; count again")
    if dtype is not None:
        tables = {n: t.to(DTYPES[dtype]) for n, t in tables.items()}
    dtype_name = DTYPE_NAMES[next(iter(tables.values())).dtype]
    plan = make_plan(counts, hbm_bytes, dram_bytes, dtype_name, {n: t.shape[1] for n, t in tables.items()})
    tier_plan = tier_plan_manifest(plan, hbm_bytes, dram_bytes)
    order = {n: torch.from_numpy(counts.order(n)) for n in tables}
    start = time.perf_counter()
    if shards > 1:
        from engram_store.sharded import write_shards

        head_rows = None
        if owner == "head_ranges":
            if ckpt.hash_config is None:
                raise EngramStoreError(f"{checkpoint} has no hash config, so its heads are unknown: "
                                       "use --owner row_mod_n")
            head_rows = _head_rows(NgramHasher(ckpt.hash_config), tables)
        write_shards(out, tables, order, shards, owner=owner, head_rows=head_rows, backend=backend,
                     fingerprint=ckpt.fingerprint, tier_plan=tier_plan, overwrite=overwrite)
    else:
        from engram_store.writer import write

        write(out, tables, order, backend=backend, fingerprint=ckpt.fingerprint, tier_plan=tier_plan,
              overwrite=overwrite)
    seconds = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in tables.values())
    return {"store": str(out), "backend": backend, "shards": shards, "tables": {n: list(t.shape) for n, t in tables.items()},
            "dtype": dtype_name, "bytes": nbytes, "seconds": seconds, "mb_per_s": nbytes / 1e6 / max(seconds, 1e-9),
            "plan": {n: vars(p) for n, p in plan.items()}}


def _head_rows(hasher, tables) -> dict[str, list[int]]:
    """Rows of every hash head of each table ``layer{L}`` (order-2 heads first): the head ranges' sizes."""
    return {name: [int(p) for per_order in hasher.primes[int(name.removeprefix("layer"))] for p in per_order]
            for name in tables}


def build_from_hf(checkpoint, counts: Counts | str | os.PathLike | None, out, *, hbm_bytes: int = 0,
                  dram_bytes: int = 0, backend: str = "mmap", overwrite: bool = False, progress: bool = True,
                  shards: int = 1, owner: str = "row_mod_n") -> dict:
    """The Engram tables of a V4.1-style checkpoint as packed fp8 rows (``import_hf``), in frequency-rank
    order with a tier plan when ``counts`` are given, in checkpoint order otherwise. ``shards > 1``:
    a sharded store (``write_shards`` streaming from the checkpoint, ``owner`` as for
    :func:`build_from_checkpoint`)."""
    from engram_pipeline.counts import FP8_ROWS
    from engram_pipeline.hf_checkpoint import open_hf_checkpoint
    from engram_pipeline.import_hf import import_hf_checkpoint

    if counts is not None and not isinstance(counts, Counts):
        counts = Counts.load(counts)
    with open_hf_checkpoint(checkpoint) as ck:
        rows = {n: t.rows for n, t in ck.tables.items()}
    plan = tier_plan = None
    if counts is not None:
        plan = make_plan(counts, hbm_bytes, dram_bytes, FP8_ROWS, {n: 256 for n in rows})
        tier_plan = tier_plan_manifest(plan, hbm_bytes, dram_bytes)
    start = time.perf_counter()
    if shards > 1:
        _write_hf_shards(checkpoint, counts, out, shards, owner, backend, tier_plan, overwrite, progress)
    else:
        import_hf_checkpoint(checkpoint, out, counts=counts, backend=backend, overwrite=overwrite,
                             tier_plan=tier_plan, progress=progress)
    seconds = time.perf_counter() - start
    nbytes = sum(rows.values()) * 264
    return {"store": str(out), "backend": backend, "shards": shards, "owner": owner if shards > 1 else None,
            "tables": {n: [r, 264] for n, r in rows.items()},
            "dtype": FP8_ROWS, "bytes": nbytes, "seconds": seconds, "mb_per_s": nbytes / 1e6 / max(seconds, 1e-9),
            "rank_order": counts is not None, "plan": {n: vars(p) for n, p in (plan or {}).items()}}


def _write_hf_shards(checkpoint, counts: Counts | None, out, shards: int, owner: str, backend: str,
                     tier_plan: dict | None, overwrite: bool, progress: bool) -> None:
    """A sharded store of the checkpoint's packed rows, read range by range (bounded memory)."""
    from tqdm import tqdm

    from engram_pipeline.hf_checkpoint import open_hf_checkpoint
    from engram_store.format.fp8_rows import FORMAT_NAME, ROW_BYTES
    from engram_store.sharded import RangeSource, TableSpec, write_shards

    with open_hf_checkpoint(checkpoint) as ck:
        if counts is not None:
            counts.check_fingerprint(ck.fingerprint, f"checkpoint {checkpoint}")
        specs = {n: TableSpec(t.rows, ROW_BYTES, torch.uint8, FORMAT_NAME) for n, t in ck.tables.items()}
        source = RangeSource(specs, lambda n, a, b: next(ck.iter_rows(n, a, b, chunk_rows=max(1, b - a))))
        order = None if counts is None else {n: counts.order(n) for n in specs}
        total = sum(s.rows for s in specs.values()) * ROW_BYTES * (1 if order is None else 2)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"build {shards} shards", disable=None if progress else True) as bar:
            write_shards(out, source, order, shards, owner=owner,
                         head_rows=_head_rows(ck.hasher(), specs) if owner == "head_ranges" else None,
                         backend=backend, fingerprint=ck.fingerprint, tier_plan=tier_plan, overwrite=overwrite,
                         progress=bar.update)


# -- synthetic tables --------------------------------------------------------------------

_SYNTH_BASIS = 4099  # prime: rows r and r + k * 4099 differ by their per-row offset alone


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread 64-bit hash of each element."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def synthetic_rows(seed: int, ids, dim: int, dtype: str = "float32", table: int = 0) -> torch.Tensor:
    """Rows ``ids`` of a synthetic table: a pure function of (seed, table, row id).

    Row r = basis[r % 4099] + offset(r), with a seeded random basis and a hashed per-row
    offset, so any row can be regenerated alone (tests and scale checks of an 8 GiB table
    need no copy of it) at the cost of a gather and an add per element.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    basis = np.random.default_rng([seed, table]).standard_normal((_SYNTH_BASIS, dim), dtype=np.float32)
    key = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B1 + table * 0x85EBCA77) & 0xFFFFFFFF) * np.uint64(1 << 32)
    offset = (_mix64(key) >> np.uint64(40)).astype(np.float32) * np.float32(2.0 / 2**24) - np.float32(1.0)
    # torch for the gather and add: multi-threaded, about twice numpy's speed here.
    values = torch.from_numpy(basis)[torch.from_numpy(ids % _SYNTH_BASIS)]
    values += torch.from_numpy(offset)[:, None]
    return values.to(DTYPES[dtype])


def build_synthetic(out, *, rows: int, dim: int, dtype: str = "float32", backend: str = "mmap", tables: int = 1,
                    seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """A store of ``tables`` random tables ``rows x dim``, streamed: memory use independent of ``rows``."""
    from tqdm import tqdm

    if rows < 1 or dim < 1 or tables < 1:
        raise InvalidValuesError(f"synthetic tables need rows >= 1, dim >= 1, tables >= 1; got {rows}, {dim}, {tables}")
    if dtype not in DTYPES:
        raise InvalidValuesError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    out = Path(out)
    _check_out(out, overwrite)
    row_bytes = dim * DTYPE_BYTES[dtype]
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    total = rows * row_bytes * tables
    start = time.perf_counter()
    with StoreWriter(out, backend=backend, overwrite=overwrite,
                     tier_plan={"synthetic": {"seed": seed, "rows": rows, "dim": dim, "dtype": dtype}}) as w, \
            tqdm(total=total, unit="B", unit_scale=True, desc="build", disable=None if progress else True) as bar:
        for t in range(tables):
            name = table_name(t)
            w.add_table(name, rows, dim, DTYPES[dtype])
            for s in range(0, rows, chunk):
                e = min(rows, s + chunk)
                w.write_rows(name, synthetic_rows(seed, np.arange(s, e), dim, dtype, t))
                bar.update((e - s) * row_bytes)
    seconds = time.perf_counter() - start
    return {"store": str(out), "backend": backend, "rows": rows, "dim": dim, "dtype": dtype, "tables": tables,
            "bytes": total, "seconds": seconds, "mb_per_s": total / 1e6 / seconds}


# -- reading whole tables back, converting ---------------------------------------------

def _rank_chunks(store: TieredStore, name: str):
    info = store.tables[name]
    step = max(1, _CHUNK_BYTES // info.row_bytes)
    for s in range(0, info.rows, step):
        e = min(info.rows, s + step)
        yield s, e, store.read_ranks(name, s, e)


def read_tables(path) -> dict[str, torch.Tensor]:
    """Every table of the store at ``path``, rows in original row order (checksums verified)."""
    out = {}
    with TieredStore(path, device="cpu") as store:
        for name, info in store.tables.items():
            remap = store.remap(name)
            by_rank = torch.empty((info.rows, info.dim), dtype=info.dtype)
            for s, e, rows in _rank_chunks(store, name):
                by_rank[s:e] = rows
            out[name] = by_rank[torch.from_numpy(remap)]
    return out


def convert_backend(src, dst, backend: str, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Copy the store at ``src`` to ``dst`` with another backend; same rank order, fingerprint and plan.
    A sharded store is joined into one store in global row order (``join_shards``, bounded memory)."""
    from tqdm import tqdm

    dst = Path(dst)
    _check_out(dst, overwrite)
    start = time.perf_counter()
    if (Path(src) / "shards.json").is_file():  # a sharded store: joined, streaming (global row order)
        from engram_store.sharded import join_shards, read_layout

        join_shards(src, dst, backend=backend, overwrite=overwrite)
        total = sum(int(m["rows"]) * int(m["dim"]) * DTYPES[m["dtype"]].itemsize
                    for m in read_layout(src)["tables"].values())
        return {"source": str(src), "store": str(dst), "backend": backend, "bytes": total,
                "seconds": time.perf_counter() - start}
    with TieredStore(src, device="cpu") as store:
        total = sum(i.nbytes for i in store.tables.values())
        with StoreWriter(dst, backend=backend, fingerprint=store.fingerprint,
                         tier_plan=store.manifest.get("tier_plan"), overwrite=overwrite) as w, \
                tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=None if progress else True) as bar:
            for name, info in store.tables.items():
                w.add_table(name, info.rows, info.dim, info.dtype, order=np.argsort(store.remap(name), kind="stable"),
                            row_format=info.row_format)
                for s, e, rows in _rank_chunks(store, name):
                    w.write_rows(name, rows)
                    bar.update((e - s) * info.row_bytes)
    seconds = time.perf_counter() - start
    return {"source": str(src), "store": str(dst), "backend": backend, "bytes": total, "seconds": seconds}


def export_safetensors(src, out, *, overwrite: bool = False) -> dict:
    """Store (or a folder of shards) → one safetensors file of full tables in original row order.

    The file's metadata carries the fingerprint, so it can be checked against a checkpoint.
    """
    from safetensors.torch import save_file

    out = Path(out)
    _check_out(out, overwrite)
    src = Path(src)
    if (src / "manifest.json").is_file():
        tables, fingerprint = read_tables(src), read_manifest(src).get("fingerprint")
    else:
        from engram_store.sharded import join_shards, read_layout

        tables, fingerprint = join_shards(src), read_layout(src).get("fingerprint")
    partial = out.with_name(out.name + ".partial")
    try:
        save_file({n: t.contiguous() for n, t in tables.items()}, str(partial),
                  metadata={"format": "engram-store-export/1", "fingerprint": json.dumps(fingerprint)})
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"source": str(src), "output": str(out), "tables": {n: list(t.shape) for n, t in tables.items()}}


def import_safetensors(file, out, *, backend: str = "mmap", counts: Counts | None = None,
                       overwrite: bool = False) -> dict:
    """safetensors tables → store (ranked by ``counts`` when given, else in row order)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise StoreNotFoundError(f"{file} does not exist")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    fingerprint = json.loads(meta["fingerprint"]) if "fingerprint" in meta else None
    tables = load_file(str(file))
    order = None
    if counts is not None:
        if fingerprint is not None:
            counts.check_fingerprint(fingerprint, str(file))
        order = {n: torch.from_numpy(counts.order(n)) for n in tables}
    from engram_store.writer import write

    write(out, tables, order, backend=backend, fingerprint=fingerprint, overwrite=overwrite)
    return {"source": str(file), "store": str(out), "backend": backend}
