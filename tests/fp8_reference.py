"""DeepSeek-V4.1's packed fp8 row decoded from the format's definition, in plain Python (shared by tests).

The scalar functions follow the OCP FP8 E4M3 and MX E8M0 definitions bit by bit, with math.ldexp and a
bfloat16 round-to-nearest-even done by hand on float32 bits. ``dequantize`` applies them to tensors
through a table of all 256 x 256 (code, scale byte) pairs, each computed by the scalar reference.
"""

from __future__ import annotations

import functools
import math
import struct

import torch

CANONICAL_NAN = 0x7FC0


def ref_e4m3(code: int) -> float:
    """OCP FP8 E4M3: sign, 4 exponent bits (bias 7), 3 mantissa bits, S.1111.111 = NaN, no inf."""
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * math.ldexp(man, -9)  # (man / 8) * 2^(1 - 7)
    return sign * math.ldexp(8 + man, exp - 7 - 3)  # (1 + man / 8) * 2^(exp - 7)


def ref_scale(byte: int) -> float:
    """OCP MX E8M0: 2^(byte - 127); 0 -> 2^-127, 255 -> NaN."""
    return math.nan if byte == 255 else math.ldexp(1.0, byte - 127)


def f32_bits(x: float) -> int:
    """float32 bits of a float64 that float32 holds exactly (or is beyond its range: +-inf)."""
    if math.isnan(x):
        return 0x7FC00000
    if abs(x) >= 2.0**128:
        return 0xFF800000 if x < 0 else 0x7F800000
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    assert struct.unpack("<f", struct.pack("<I", bits))[0] == x, "product must be exact in float32"
    return bits


def ref_bf16_bits(x: float) -> int:
    """bfloat16 bits (as signed int16) of x: float32 bits, round the low 16 to nearest, ties to even."""
    if math.isnan(x):
        b = CANONICAL_NAN
    else:
        u = f32_bits(x)
        b = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return b - 0x10000 if b >= 0x8000 else b


def ref_dequantize_row(row_bytes) -> list[int]:
    vals, scales = row_bytes[:256], row_bytes[256:]
    return [ref_bf16_bits(ref_e4m3(vals[i]) * ref_scale(scales[i // 32])) for i in range(256)]


@functools.lru_cache(maxsize=1)
def _bits_table() -> torch.Tensor:
    """int16 [scale byte, code] -> bfloat16 bits of e4m3(code) * 2^(scale - 127), from the scalar reference."""
    return torch.tensor([[ref_bf16_bits(ref_e4m3(c) * ref_scale(s)) for c in range(256)] for s in range(256)],
                        dtype=torch.int16)


def dequantize(packed: torch.Tensor) -> torch.Tensor:
    """bfloat16 [..., 256] of packed uint8 rows [..., 264] (on the CPU), by the reference definition."""
    p = packed.cpu().reshape(-1, 264).long()
    scale = p[:, 256:].repeat_interleave(32, dim=1)  # the scale byte of each value
    bits = _bits_table()[scale, p[:, :256]]
    return bits.view(torch.bfloat16).reshape(*packed.shape[:-1], 256)
