"""Where :func:`engram_store.sharded.write_shards` reads rows from: any source of row ranges.

A source names its tables (:class:`TableSpec`: rows, dim, dtype, row format) and reads a range of
rows in *global row order*: ``read(name, start, stop) -> Tensor[stop - start, dim]``. Nothing more,
so a dense tensor, a checkpoint read by positioned reads (``RangeSource`` over
``HFCheckpoint.iter_rows``), a store or another sharded store can feed a sharded build, and only
the range being read is in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from engram_store.errors import InvalidValuesError
from engram_store.format.rows import check_row_format


@dataclass(frozen=True)
class TableSpec:
    rows: int
    dim: int
    dtype: torch.dtype
    row_format: str | None = None  # how uint8 rows decode (format.ROW_FORMATS), or None

    @property
    def row_bytes(self) -> int:
        return self.dim * torch.empty((), dtype=self.dtype).element_size()


@runtime_checkable
class RowSource(Protocol):
    specs: Mapping[str, TableSpec]

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop`` of ``name`` in global row order: ``Tensor[stop - start, dim]`` on the CPU."""


class DenseSource:
    """Tables held as tensors ``{name: Tensor[rows, dim]}`` (tests, small tables)."""

    def __init__(self, tables: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(tables, Mapping) or not tables:
            raise InvalidValuesError("tables must be a non-empty mapping {name: Tensor[rows, dim]}")
        for name, t in tables.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                shape = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidValuesError(f"table {name!r} must be a 2-D torch.Tensor [rows, dim], got {shape}")
        self.tables = dict(tables)
        self.specs = {n: TableSpec(int(t.shape[0]), int(t.shape[1]), t.dtype) for n, t in self.tables.items()}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tables[name][start:stop]


class RangeSource:
    """Tables described by ``specs`` and read by ``read(name, start, stop)`` (a checkpoint, a generator)."""

    def __init__(self, specs: Mapping[str, TableSpec], read: Callable[[str, int, int], torch.Tensor]) -> None:
        if not specs:
            raise InvalidValuesError("a source needs at least one table")
        for name, s in specs.items():
            check_row_format(s.row_format, s.dtype, s.dim, f"table {name!r}")
        self.specs = dict(specs)
        self._read = read

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, start, stop)


class StoreSource:
    """The tables of an open store (``engram_store.open``), read in global row order as stored bytes."""

    def __init__(self, store) -> None:
        self.store = store
        self.specs = {n: TableSpec(i.rows, i.dim, i.dtype, i.row_format) for n, i in store.tables.items()}

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.store.lookup(name, torch.arange(start, stop), dequantize=False).cpu()


def as_source(tables) -> RowSource:
    """``tables`` as a source: a RowSource as is, a mapping of tensors as a :class:`DenseSource`."""
    if isinstance(tables, Mapping):
        return DenseSource(tables)
    if isinstance(tables, RowSource):
        return tables
    raise InvalidValuesError(f"tables must be a mapping {{name: Tensor[rows, dim]}} or a RowSource "
                             f"(specs + read(name, start, stop)), got {type(tables).__name__}")
