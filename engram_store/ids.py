"""Row ids and rank orders checked at the public boundaries (one implementation for the store,
the sharded store, the model's in-memory table and the writer)."""

from __future__ import annotations

import numpy as np
import torch

from engram_store.errors import InvalidRowIdsError, InvalidValuesError


def as_ids(row_ids, rows: int, table: str) -> np.ndarray:
    """``row_ids`` (a tensor, array or sequence of any integer dtype and shape) as int64 NumPy, checked.

    Raises InvalidRowIdsError for a non-integer dtype or an id outside ``[0, rows)``. Unsigned ids
    are accepted as long as they fit; an empty float array is read as no ids.
    """
    if isinstance(row_ids, torch.Tensor):
        if row_ids.dtype.is_floating_point or row_ids.dtype.is_complex or row_ids.dtype == torch.bool:
            raise InvalidRowIdsError(f"row ids of table {table!r} must be integers, got {row_ids.dtype}")
        a = row_ids.detach().cpu().numpy()
    else:
        a = np.asarray(row_ids)
        if a.size == 0 and a.dtype.kind == "f":
            a = a.astype(np.int64)
        if a.dtype.kind not in "iu":
            raise InvalidRowIdsError(f"row ids of table {table!r} must be integers, got {a.dtype}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise InvalidRowIdsError(f"row ids of table {table!r} must be in [0, {rows})")
    a = a.astype(np.int64, copy=False)
    # one pass: a negative id viewed as uint64 is >= 2**63, so it fails the same bound
    if a.size and int(a.view(np.uint64).max()) >= rows:
        lo, hi = int(a.min()), int(a.max())
        raise InvalidRowIdsError(f"row ids of table {table!r} must be in [0, {rows}); got min {lo}, max {hi}")
    return a


def as_id_tensor(row_ids, rows: int, table: str) -> torch.Tensor:
    """:func:`as_ids` as an int64 tensor (on the input's device when it is a tensor)."""
    device = row_ids.device if isinstance(row_ids, torch.Tensor) else torch.device("cpu")
    return torch.from_numpy(as_ids(row_ids, rows, table)).to(device)


def as_permutation(order, rows: int, what: str = "order", error: type[Exception] = InvalidValuesError) -> np.ndarray:
    """``order`` as int32/int64 NumPy, checked to be a permutation of ``0..rows-1``; raises ``error`` if not
    (InvalidValuesError for a caller's argument, StoreCorruptError for a stored remap)."""
    o = order.detach().cpu().numpy() if isinstance(order, torch.Tensor) else np.asarray(order)
    if o.dtype.kind not in "iu" or o.shape != (rows,):
        raise error(f"{what} must be {rows} integer row ids (rank -> row id), got {o.dtype} {o.shape}")
    # int32 stays int32 (a 384 M-row order is 1.5 GB; its int64 copy would be 3 GB more)
    o = o.astype(np.int32 if o.dtype.itemsize <= 4 and rows < 2**31 else np.int64, copy=False)
    if rows:
        if o.min() < 0 or o.max() >= rows:
            raise error(f"{what} holds row ids out of range: it must be a permutation of 0..{rows - 1}")
        seen = np.zeros(rows, bool)
        seen[o] = True
        if not seen.all():
            raise error(f"{what} is not a permutation of 0..{rows - 1} (a row id repeats)")
    return o
