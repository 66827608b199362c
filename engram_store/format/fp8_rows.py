"""DeepSeek-V4.1's quantized Engram row ("fp8_e4m3_ue8m0"): the checkpoint's own 264 bytes per row.

Row layout (one row = ``ROW_BYTES`` = 264 bytes, no padding)::

    bytes   0..255   256 values, OCP FP8 E4M3 ("e4m3fn"): 1 sign bit, 4 exponent bits (bias 7),
                     3 mantissa bits; exponent 0 = subnormal (m/8 * 2^-6); no infinities;
                     0x7F and 0xFF are NaN; largest finite magnitude 448
    bytes 256..263   8 scale bytes, UE8M0 (OCP MX E8M0: 8 exponent bits, bias 127, no sign, no
                     mantissa); scale byte k applies to values 32k .. 32k+31

    value[i] = e4m3(byte[i]) * 2^(scale[i // 32] - 127), returned as bfloat16.

Edge scale bytes, as the OCP MX specification defines E8M0: a scale byte of 0 is 2^-127 (not 0.0;
it is a float32 subnormal, held exactly), 255 is NaN (every value of its 32 turns NaN). Every NaN
that ``dequantize`` returns has the one bit pattern ``BF16_NAN_BITS`` (0x7FC0, positive quiet NaN)
on every device, so results compare bit for bit.

The decode is exact: an e4m3 value is exact in float32, a power of two times it is exact in
float32 (the smallest product, 2^-9 * 2^-127, is above float32's 2^-149), and the one rounding is
float32 -> bfloat16, round to nearest even. The rounding only ever bites for tiny scales, where a
product falls below bfloat16's normal range; products of 2^128 or more become +-inf.

Everything here works on *gathered* rows (a batch, never a table) and on the rows' own device.
"""

from __future__ import annotations

import torch

from engram_store.errors import InvalidValuesError

FORMAT_NAME = "fp8_e4m3_ue8m0"
VALUES = 256  # e4m3 values per row
SCALES = 8  # UE8M0 scale bytes per row
BLOCK = VALUES // SCALES  # values sharing one scale byte
ROW_BYTES = VALUES + SCALES  # 264
E4M3_MAX = 448.0
SCALE_BIAS = 127
SCALE_NAN = 255
BF16_NAN_BITS = 0x7FC0

_FP8_VALUE_DTYPES = (torch.uint8, torch.float8_e4m3fn)
_FP8_SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)


def _e4m3_float32() -> torch.Tensor:
    """float32 value of each of the 256 e4m3 codes, assembled from the bit fields (no libm)."""
    code = torch.arange(256, dtype=torch.int32)
    exp, man = (code >> 3) & 0xF, code & 0x7
    # a normal e4m3 (exp >= 1) is the float32 with exponent field exp - 7 + 127, top mantissa bits man
    normal = (((exp + 120) << 23) | (man << 20)).view(torch.float32)
    subnormal = man.to(torch.float32) * 2.0**-9  # man/8 * 2^-6, exact
    mag = torch.where(exp == 0, subnormal, normal)
    mag = torch.where((code & 0x7F) == 0x7F, torch.tensor(float("nan")), mag)
    return torch.where(code >= 0x80, -mag, mag)


def _scale_float32() -> torch.Tensor:
    """float32 2^(s - 127) of each scale byte s (0 -> 2^-127, a subnormal), NaN for 255."""
    s = torch.arange(256, dtype=torch.int32)
    scale = (s << 23).view(torch.float32)
    scale[0] = torch.tensor(0x00400000, dtype=torch.int32).view(torch.float32)  # 2^-127: mantissa bit 22
    scale[SCALE_NAN] = float("nan")
    return scale


def _decode_table() -> torch.Tensor:
    """int16 bfloat16 bits of every (scale byte, e4m3 code) pair, indexed ``scale * 256 + code``.

    One table gather per value is the whole decode: no per-value float arithmetic or NaN
    fix-up on the hot path, and the same bits on every device because the table is built once
    here, on the CPU.
    """
    values = _e4m3_float32()  # (256,) float32
    scale = _scale_float32()  # (256,) float32
    product = scale.view(256, 1) * values.view(1, 256)  # exact in float32 (see module docstring)
    bits = product.to(torch.bfloat16).view(torch.int16)  # the one round-to-nearest-even
    bits[torch.isnan(product)] = BF16_NAN_BITS  # torch leaves NaN bits to the device
    return bits.reshape(-1).contiguous()


_TABLE_CPU = _decode_table()
_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    t = _TABLES.get(device)
    if t is None:
        t = _TABLE_CPU.to(device)
        _TABLES[device] = t
    return t


def _check_packed(packed, what: str) -> torch.Tensor:
    if not isinstance(packed, torch.Tensor):
        raise InvalidValuesError(f"{what}: packed rows must be a torch.Tensor of uint8, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise InvalidValuesError(
            f"{what}: packed {FORMAT_NAME} rows must be uint8, got {packed.dtype}; "
            "pass the rows' raw bytes (tensor.view(torch.uint8))"
        )
    if packed.dim() == 0 or packed.shape[-1] != ROW_BYTES:
        raise InvalidValuesError(
            f"{what}: packed {FORMAT_NAME} rows must have shape [..., {ROW_BYTES}] "
            f"({VALUES} e4m3 bytes + {SCALES} scale bytes), got {tuple(packed.shape)}"
        )
    return packed


def dequantize(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 264] -> bfloat16 [..., 256] on ``packed.device`` (exact; see module docstring)."""
    packed = _check_packed(packed, "dequantize")
    lead = packed.shape[:-1]
    n = packed.numel() // ROW_BYTES
    rows = packed.reshape(n, ROW_BYTES)
    # Table index scale * 256 + code, built as little-endian int32 bytes [code, scale, 0, 0]:
    # two same-dtype strided byte copies, cheaper than widening both bytes to int32 and adding.
    index = torch.zeros(n, SCALES, BLOCK, 4, dtype=torch.uint8, device=packed.device)
    index[..., 0] = rows[:, :VALUES].view(n, SCALES, BLOCK)
    index[..., 1] = rows[:, VALUES:].unsqueeze(-1)
    bits = _table(packed.device).index_select(0, index.view(torch.int32).view(-1))
    return bits.view(torch.bfloat16).view(*lead, VALUES)


def _as_bytes(t, name: str, last: int, dtypes: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidValuesError(f"pack: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise InvalidValuesError(
            f"pack: {name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}; "
            "quantize float values with fp8_rows.quantize instead"
        )
    if t.dim() == 0 or t.shape[-1] != last:
        raise InvalidValuesError(f"pack: {name} must have shape [..., {last}], got {tuple(t.shape)}")
    return t.view(torch.uint8)


def pack(values_e4m3: torch.Tensor, scales_e8m0: torch.Tensor) -> torch.Tensor:
    """The checkpoint's two tensors -> packed rows uint8 [..., 264] (values first, then scales).

    ``values_e4m3`` [..., 256] is uint8 codes or torch.float8_e4m3fn; ``scales_e8m0`` [..., 8] is
    uint8 or torch.float8_e8m0fnu (the safetensors dtypes F8_E4M3 and F8_E8M0). Bytes are copied
    unchanged.
    """
    values = _as_bytes(values_e4m3, "values_e4m3", VALUES, _FP8_VALUE_DTYPES)
    scales = _as_bytes(scales_e8m0, "scales_e8m0", SCALES, _FP8_SCALE_DTYPES)
    if values.shape[:-1] != scales.shape[:-1]:
        raise InvalidValuesError(
            f"pack: values {tuple(values.shape)} and scales {tuple(scales.shape)} must have the same "
            "leading shape (one row of 256 values per 8 scale bytes)"
        )
    if values.device != scales.device:
        raise InvalidValuesError(f"pack: values on {values.device} but scales on {scales.device}")
    return torch.cat([values, scales], dim=-1)


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows -> (values uint8 [..., 256], scales uint8 [..., 8]): views into ``packed``."""
    packed = _check_packed(packed, "unpack")
    return packed[..., :VALUES], packed[..., VALUES:]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """float [..., 256] -> packed rows: per 32 values the smallest power-of-two scale that fits 448.

    For generators and tests. Scale byte s is the smallest in [0, 254] with max|x| * 2^(127-s)
    <= 448 (127, i.e. 1.0, for an all-zero block); values are then rounded to e4m3, nearest even.
    A block whose max|x| exceeds 448 * 2^127 cannot be represented and is refused.
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidValuesError(f"quantize: values must be a floating-point tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] != VALUES:
        raise InvalidValuesError(f"quantize: values must have shape [..., {VALUES}], got {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InvalidValuesError("quantize: values contain NaN or inf; e4m3 rows hold finite values only")
    lead = x.shape[:-1]
    blocks = x.to(torch.float64).reshape(*lead, SCALES, BLOCK)  # exact for float32/16 and bfloat16 input
    amax = blocks.abs().amax(dim=-1)  # (..., 8)
    # amax = m * 2^q, m in [0.5, 1): the smallest e with amax * 2^-e <= 448 = 0.875 * 2^9 is q - 9
    # when m <= 0.875, else q - 8. Bit exact, unlike log2 of a division.
    mant, q = torch.frexp(amax)
    e = q.to(torch.float64) - torch.where(mant <= 0.875, 9.0, 8.0)
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    if e.numel() and int(e.max()) > SCALE_NAN - 1 - SCALE_BIAS:
        raise InvalidValuesError(
            f"quantize: a block's max |value| exceeds {E4M3_MAX} * 2^127, beyond what e4m3 with a "
            "UE8M0 scale can hold"
        )
    e = e.clamp(min=-SCALE_BIAS)  # tinier blocks keep 2^-127 and round towards 0
    scaled = torch.ldexp(blocks, -e.unsqueeze(-1)).to(torch.float32)  # |scaled| <= 448
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8).reshape(*lead, VALUES)
    scales = (e + SCALE_BIAS).to(torch.uint8)
    return pack(codes, scales)
