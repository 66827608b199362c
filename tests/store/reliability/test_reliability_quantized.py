"""The quantized row codec of the concurrency workload (row_soak.py): a packed fp8 table, and its own check.

The table holds DeepSeek-V4.1's packed rows (``fp8_e4m3_ue8m0``: 256 e4m3 bytes + 8 UE8M0 scale bytes).
Row ``r`` at version ``v`` is ``packed_row(r, v)``: its first 8 value bytes spell ``v`` and the next 8
spell ``r`` (one hex digit each, as e4m3 codes 0x10..0x1F under scale byte 127), the other 240 value
bytes and 7 scale bytes are a hash of ``(r, v)``. So any returned row names its version and id, and
the whole row is then checked against ``packed_row(r, v)`` recomputed: a torn row (bytes of two
versions), a row of another id or a stale row all fail. Dequantized reads are decoded the same way
through the plain-Python reference decoding (tests/fp8_reference.py) and must equal, bit for bit,
the reference decoding of ``packed_row(r, v)``. Readers ask for packed or dequantized rows at random;
the end-of-run checks read every row both ways. The runs themselves are test_reliability_concurrency.py's,
parametrised by codec.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fp8_reference
from engram_pipeline.v41_checkpoint import _mix64_
from engram_store.format import fp8_rows
from row_soak import Read, RowCodec

pytestmark = pytest.mark.reliability

DIGIT_CODE = 0x10  # e4m3 codes 0x10..0x1F: 16 distinct finite values (2^-5 .. 1.875 * 2^-5)
DIGIT_SCALE = 127  # scale byte of values 0..31: 2^0


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of ``x`` (the generator's mixer: any well-spread 64-bit hash would do here)."""
    return _mix64_(x.astype(np.uint64))


def _digits(x: np.ndarray) -> np.ndarray:
    """[n, 8] e4m3 codes spelling x (< 2**32), least significant hex digit first."""
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(4)
    return (DIGIT_CODE + ((x.astype(np.uint64)[:, None] >> shifts) & np.uint64(15))).astype(np.uint8)


def packed_row(ids: np.ndarray, versions: np.ndarray) -> torch.Tensor:
    """uint8 [n, 264]: the packed rows of (id, version) pairs."""
    ids, versions = np.asarray(ids, np.int64).reshape(-1), np.asarray(versions, np.int64).reshape(-1)
    key = (versions.astype(np.uint64) << np.uint64(20)) | ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        words = _mix(key[:, None] * np.uint64(64) + np.arange(31, dtype=np.uint64))  # 248 bytes of hash
    noise = words.astype("<u8").view(np.uint8).reshape(-1, 248)
    out = np.empty((ids.size, fp8_rows.ROW_BYTES), dtype=np.uint8)
    out[:, 0:8] = _digits(versions)
    out[:, 8:16] = _digits(ids)
    out[:, 16:256] = noise[:, :240]
    out[:, 256] = DIGIT_SCALE
    out[:, 257:264] = 110 + noise[:, 240:247] % 31
    return torch.from_numpy(out)


def _spelled(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(number, ok) from [n, 8] digit codes."""
    d = codes.astype(np.int64) - DIGIT_CODE
    ok = ((d >= 0) & (d < 16)).all(axis=1)
    return (np.clip(d, 0, 15) << (4 * np.arange(8))).sum(axis=1), ok


def decode_packed(ids: np.ndarray, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(versions, ok) of packed rows read for ``ids``: ok is False for a torn row or one of another id."""
    a = rows.reshape(-1, fp8_rows.ROW_BYTES).numpy()
    v, ok_v = _spelled(a[:, 0:8])
    r, ok_r = _spelled(a[:, 8:16])
    ok = ok_v & ok_r & (r == ids.reshape(-1))
    want = packed_row(np.where(ok, r, 0), np.where(ok, v, 0)).numpy()
    return v, ok & (a == want).all(axis=1)


_DIGIT_OF_BITS = None  # [65536]: bf16 bits (as uint16) -> hex digit, 16 for bits no digit decodes to


def decode_dequantized(ids: np.ndarray, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(versions, ok) of bf16 rows [n, 256]: digits read back through the reference decoding's bit patterns."""
    global _DIGIT_OF_BITS
    if _DIGIT_OF_BITS is None:
        ref = fp8_reference._bits_table()[DIGIT_SCALE, DIGIT_CODE:DIGIT_CODE + 16].numpy().view(np.uint16)
        assert len(set(ref.tolist())) == 16
        _DIGIT_OF_BITS = np.full(1 << 16, 16, np.int64)
        _DIGIT_OF_BITS[ref] = np.arange(16)
    bits = values.reshape(-1, 256).view(torch.int16).numpy()
    codes = DIGIT_CODE + _DIGIT_OF_BITS[bits[:, :16].view(np.uint16)]
    v, ok_v = _spelled(codes[:, 0:8])
    r, ok_r = _spelled(codes[:, 8:16])
    ok = ok_v & ok_r & (r == ids.reshape(-1))
    want = fp8_reference.dequantize(packed_row(np.where(ok, r, 0), np.where(ok, v, 0))).view(torch.int16).numpy()
    return v, ok & (bits == want).all(axis=1)


FP8_ROWS = RowCodec(fp8_rows.FORMAT_NAME, torch.uint8, fp8_rows.ROW_BYTES, fp8_rows.FORMAT_NAME, packed_row,
                   (Read("packed", {"dequantize": False}, fp8_rows.ROW_BYTES, decode_packed),
                    Read("dequantized", {"dequantize": True}, 256, decode_dequantized)))


def test_the_encoding_is_what_it_says():
    """The encoding's own check: versions and ids read back, a torn row and a wrong id are caught."""
    ids, vs = np.array([0, 5, 1023]), np.array([0, 77, 2**31 + 3])
    rows = packed_row(ids, vs)
    v, ok = decode_packed(ids, rows)
    assert ok.all() and (v == vs).all()
    v, ok = decode_dequantized(ids, fp8_reference.dequantize(rows))
    assert ok.all() and (v == vs).all()
    torn = rows.clone()
    torn[1, 100:] = packed_row(ids[1:2], vs[1:2] + 1)[0, 100:]
    assert decode_packed(ids, torn)[1].tolist() == [True, False, True]
    assert decode_dequantized(ids, fp8_reference.dequantize(torn))[1].tolist() == [True, False, True]
    assert decode_packed(np.array([0, 6, 1023]), rows)[1].tolist() == [True, False, True]
