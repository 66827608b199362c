"""Row formats: the dtypes a table may hold, a table's shape (:class:`TableInfo`), block sizes, crc32.

A table holds float32 / float16 / bfloat16 values, or opaque uint8 rows. A uint8 table may name a
*row format* that says how its bytes decode (``ROW_FORMATS``): ``fp8_e4m3_ue8m0`` is DeepSeek-V4.1's
264-byte row (``fp8_rows``), stored as the checkpoint's own bytes and decoded on the store's
device after the gather.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engram_store.errors import EngramStoreError, InvalidValuesError, StoreCorruptError

# One checksum block is one 4 KiB page of rows for mmap (a cold read costs a page fault
# anyway, so verifying the whole block is free).
MMAP_BLOCK_BYTES = 4096

# An LMDB block is as many rows as fit *inline* in a B-tree leaf page: a larger value goes to
# overflow pages, and a cold read then faults the leaf and the overflow pages one after another
# (measured, docs/cold_path.md: 4 KiB blocks cost a leaf + 2 overflow pages and read at ~0.4x the
# inline layout's rate). LMDB 0.9 keeps a node inline while 8 (node header) + key + value bytes
# are at most ``((page - 16) // 2 & ~1) - 2`` (``me_nodemax``: two nodes per page at least).
# The stored value is the raw block plus ``LMDB_VALUE_OVERHEAD`` bytes (crc32, codec byte).
LMDB_VALUE_OVERHEAD = 5
LMDB_PAGE_BYTES = min(4096 if not hasattr(os, "sysconf") else os.sysconf("SC_PAGE_SIZE"), 32768)


def lmdb_inline_value_bytes(key_bytes: int, page_bytes: int = LMDB_PAGE_BYTES) -> int:
    """The largest LMDB value that stays inline in a leaf page next to a ``key_bytes`` key."""
    return ((page_bytes - 16) // 2 & ~1) - 2 - 8 - int(key_bytes)


def lmdb_block_bytes(table: str) -> int:
    """Default raw bytes of an LMDB block of ``table``: what keeps its stored values inline."""
    key = len(table.encode()) + 1 + 8  # table name + "/" + 8-byte block index
    return lmdb_inline_value_bytes(key) - LMDB_VALUE_OVERHEAD


# A short table name's default (1,995 raw bytes on 4 KiB pages: 7 rows of 264 B, 15 of 128 B).
LMDB_BLOCK_BYTES = lmdb_block_bytes("t")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


# row format -> ((dtype, dim) its rows are stored as, (dtype, dim) they decode to)
ROW_FORMATS: dict[str, tuple[tuple[torch.dtype, int], tuple[torch.dtype, int]]] = {
    "fp8_e4m3_ue8m0": ((torch.uint8, 264), (torch.bfloat16, 256)),
}


def check_row_format(row_format: str | None, dtype: torch.dtype, dim: int, what: str) -> None:
    """InvalidValuesError unless ``row_format`` is None or a known format whose rows are ``dim`` ``dtype``s."""
    if row_format is None:
        return
    if row_format not in ROW_FORMATS:
        raise InvalidValuesError(f"{what}: unknown row format {row_format!r}; use one of {sorted(ROW_FORMATS)}")
    want = ROW_FORMATS[row_format][0]
    if (dtype, dim) != want:
        raise InvalidValuesError(f"{what}: row format {row_format!r} rows are {want[1]} {DTYPE_NAMES[want[0]]} "
                                 f"values, got {dim} {DTYPE_NAMES.get(dtype, dtype)}")


@dataclass(frozen=True)
class TableInfo:
    """Shape of one table: ``rows`` x ``dim`` values of ``dtype`` (a torch dtype), and the row format
    that decodes them (None: the values are the rows)."""

    rows: int
    dim: int
    dtype: torch.dtype
    row_format: str | None = None
    # Derived once: row_bytes sits on hot paths, and the element size needs a tensor to ask.
    row_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "row_bytes", self.dim * torch.empty(0, dtype=self.dtype).element_size())

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def values(self) -> tuple[torch.dtype, int]:
        """(dtype, dim) of what a read returns by default: the decoded values for a row format."""
        return (self.dtype, self.dim) if self.row_format is None else ROW_FORMATS[self.row_format][1]


def dtype_from_any(dtype: Any) -> torch.dtype:
    """``torch.float16`` / ``"float16"`` / ``np.float16`` -> torch dtype, or InvalidValuesError."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
        if name in DTYPES:
            return DTYPES[name]
    raise InvalidValuesError(f"unsupported dtype {dtype!r}: use one of {sorted(DTYPES)}")


def check_table_name(name: str) -> str:
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise EngramStoreError(
            f"invalid table name {name!r}: use letters, digits, '_', '.', '-' (e.g. 'layer1')"
        )
    return name


def table_info(name: str, entry: dict) -> TableInfo:
    """The :class:`TableInfo` of manifest entry ``entry``, or StoreCorruptError if it is malformed."""
    def whole(key):
        v = entry.get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{key} is {v!r}, not an integer")
        return v

    try:
        if not isinstance(entry, dict):
            raise TypeError(f"the entry is {type(entry).__name__}, not an object")
        if not isinstance(entry.get("row_format"), (str, type(None))):
            raise TypeError(f"row_format is {entry['row_format']!r}")
        info = TableInfo(whole("rows"), whole("dim"), DTYPES[entry["dtype"]], entry.get("row_format"))
        check_row_format(info.row_format, info.dtype, info.dim, f"table {name!r}")
        row_bytes = whole("row_bytes")
    except (KeyError, TypeError, ValueError) as e:
        raise StoreCorruptError(f"manifest entry of table {name!r} is malformed ({e!r}); rebuild the store") from e
    if info.rows < 0 or info.dim < 1 or row_bytes != info.row_bytes:
        raise StoreCorruptError(f"manifest entry of table {name!r} is inconsistent; rebuild the store")
    return info


def block_rows_for(row_bytes: int, backend: str, block_bytes: int | None = None, table: str = "t") -> int:
    """Rows per block of a new table: ``block_bytes`` of rows (default: a 4 KiB page for mmap, the
    inline size of ``table``'s LMDB values for lmdb), at least one row."""
    if block_bytes is None:
        block_bytes = MMAP_BLOCK_BYTES if backend == "mmap" else lmdb_block_bytes(table)
    return max(1, int(block_bytes) // int(row_bytes))


# Flat row files place block b at b * block_stride: the block's bytes rounded up to whole pages,
# so a block never straddles a page and a cold block read costs one page read, not two (a 15-row
# block of 264-byte V4.1 rows is 3,960 bytes; packed, 97% of blocks would touch two pages). Rows
# wider than a page would waste up to half the file in padding, so past a quarter of the stride in
# padding the blocks stay packed. The stride is recorded per table ("block_stride"); a table entry
# without it is packed (stores written before page alignment).
PAGE_BYTES = 4096
_MAX_PAD_SHARE = 4  # padding at most 1/4 of the stride


def block_stride(block_rows: int, row_bytes: int) -> int:
    """Bytes from one block's start to the next in a new flat row file."""
    used = int(block_rows) * int(row_bytes)
    stride = -(-used // PAGE_BYTES) * PAGE_BYTES
    return stride if (stride - used) * _MAX_PAD_SHARE <= stride else used


def crc32(buf) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF
