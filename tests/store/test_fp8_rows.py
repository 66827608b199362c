"""V4.1's packed e4m3 + UE8M0 rows against a plain-Python decoding written from the format's definition."""

import math

import pytest
import torch

from engram_store.errors import EngramStoreError, InvalidValuesError
from engram_store.format import fp8_rows
from fp8_reference import CANONICAL_NAN, ref_dequantize_row

EDGE_SCALES = (0, 1, 2, 100, 126, 127, 128, 200, 253, 254, 255)


# the reference (bit fields, math.ldexp, bfloat16 round-to-nearest-even by hand): tests/fp8_reference.py


def rows_every_code_every_edge_scale():
    """One row per edge scale: all 256 codes under all 8 scale bytes equal to it."""
    rows = []
    for s in EDGE_SCALES:
        rows.append(list(range(256)) + [s] * 8)
    return torch.tensor(rows, dtype=torch.uint8)


def rows_mixed(n, seed):
    """Random codes and a different random edge scale per block: checks block k <-> scale byte k."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.randint(0, 256, (n, 256), generator=g, dtype=torch.uint8)
    pick = torch.randint(0, len(EDGE_SCALES), (n, 8), generator=g)
    scales = torch.tensor(EDGE_SCALES, dtype=torch.uint8)[pick]
    return torch.cat([vals, scales], dim=1)


def assert_bits_equal_reference(packed, out):
    assert out.dtype == torch.bfloat16
    assert out.shape == (*packed.shape[:-1], 256)
    got = out.cpu().view(torch.int16).reshape(-1, 256).tolist()
    for r, row in enumerate(packed.cpu().reshape(-1, 264).tolist()):
        exp = ref_dequantize_row(row)
        if got[r] != exp:
            bad = next(i for i in range(256) if got[r][i] != exp[i])
            pytest.fail(f"row {r} value {bad}: code {row[bad]:#04x} scale {row[256 + bad // 32]} "
                        f"-> {got[r][bad] & 0xFFFF:#06x}, reference {exp[bad] & 0xFFFF:#06x}")


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_every_code_times_edge_scales_bit_for_bit(device):
    packed = rows_every_code_every_edge_scale().to(device)
    out = fp8_rows.dequantize(packed)
    assert out.device.type == device
    assert_bits_equal_reference(packed, out)


@pytest.mark.parametrize("device", devices())
def test_mixed_scales_per_block_bit_for_bit(device):
    packed = rows_mixed(64, seed=3).to(device)
    assert_bits_equal_reference(packed, fp8_rows.dequantize(packed))


def test_edge_scale_bytes_decode_as_documented():
    # value code 0x38 is 1.0 in e4m3: the scale itself comes out (rounded to bfloat16)
    row = torch.tensor([[0x38] * 256 + [0, 1, 127, 254, 255, 128, 126, 200]], dtype=torch.uint8)
    out = fp8_rows.dequantize(row).float()[0].view(8, 32)[:, 0]
    assert out[0].item() == 2.0**-127  # scale byte 0 is 2^-127, not 0.0 (bfloat16 holds it: a subnormal)
    assert out[1].item() == 2.0**-126
    assert out[2].item() == 1.0
    assert out[3].item() == 2.0**127
    assert math.isnan(out[4].item())  # scale byte 255 is NaN
    assert out[5].item() == 2.0 and out[6].item() == 0.5 and out[7].item() == 2.0**73
    nan_bits = fp8_rows.dequantize(row).view(torch.int16)[0, 4 * 32: 5 * 32]
    assert (nan_bits == CANONICAL_NAN).all()


def test_shapes_kept_and_empty():
    packed = rows_mixed(2 * 3 * 24, seed=5).view(2, 3, 24, 264)
    out = fp8_rows.dequantize(packed)
    assert out.shape == (2, 3, 24, 256)
    assert torch.equal(out.view(-1, 256).view(torch.int16), fp8_rows.dequantize(packed.view(-1, 264)).view(torch.int16))
    assert fp8_rows.dequantize(torch.zeros(0, 264, dtype=torch.uint8)).shape == (0, 256)
    one = fp8_rows.dequantize(packed[0, 0, 0])  # a single row, no leading dims
    assert one.shape == (256,) and torch.equal(one.view(torch.int16), out[0, 0, 0].view(torch.int16))
    # a non-contiguous batch (every other row of a gathered block) decodes the same
    strided = packed.view(-1, 264)[::2]
    assert torch.equal(fp8_rows.dequantize(strided).view(torch.int16),
                       fp8_rows.dequantize(strided.contiguous()).view(torch.int16))


def test_finite_values_agree_with_torch_fp8_dtypes():
    # an independent second opinion where torch has one: its own float8 dtypes (NaN excluded)
    packed = rows_mixed(128, seed=9)
    vals = packed[:, :256].view(torch.float8_e4m3fn).to(torch.float32).view(-1, 8, 32)
    scales = packed[:, 256:].view(torch.float8_e8m0fnu).to(torch.float32).unsqueeze(-1)
    expected = (vals * scales).view(-1, 256).to(torch.bfloat16)
    got = fp8_rows.dequantize(packed)
    finite = ~torch.isnan(expected)
    assert torch.equal(got.view(torch.int16)[finite], expected.view(torch.int16)[finite])
    assert torch.isnan(got[~finite].float()).all()


# ---- pack / unpack ------------------------------------------------------------------------------
def test_pack_unpack_round_trip_and_checkpoint_dtypes():
    g = torch.Generator().manual_seed(1)
    vals = torch.randint(0, 256, (5, 7, 256), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (5, 7, 8), generator=g, dtype=torch.uint8)
    packed = fp8_rows.pack(vals, scales)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, 264)
    # the row is the checkpoint's bytes: values then scales, unchanged
    assert packed[2, 3].tolist() == vals[2, 3].tolist() + scales[2, 3].tolist()
    v, s = fp8_rows.unpack(packed)
    assert torch.equal(v, vals) and torch.equal(s, scales)
    # the safetensors dtypes F8_E4M3 / F8_E8M0 arrive as torch float8 tensors: same bytes
    same = fp8_rows.pack(vals.view(torch.float8_e4m3fn), scales.view(torch.float8_e8m0fnu))
    assert torch.equal(same, packed)
    assert fp8_rows.ROW_BYTES == 264 and fp8_rows.VALUES == 256 and fp8_rows.FORMAT_NAME == "fp8_e4m3_ue8m0"


# ---- quantize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_quantize_then_dequantize_within_e4m3_error(dtype):
    g = torch.Generator().manual_seed(2)
    span = 8 if dtype == torch.float16 else 30
    x = torch.randn(40, 256, generator=g, dtype=torch.float64)
    x *= torch.logspace(-span, span, 40, base=2.0, dtype=torch.float64).unsqueeze(1)  # every row its own range
    x[3, 32:64] = 0.0  # an all-zero block
    x[4, :32] = 448.0 * 2.0**-20  # a block whose max needs exactly the boundary scale
    x = x.to(dtype).to(torch.float64)
    packed = fp8_rows.quantize(x.to(dtype))
    _, scales = fp8_rows.unpack(packed)
    assert (scales < 255).all()
    back = fp8_rows.dequantize(packed).to(torch.float64)
    blocks = x.view(40, 8, 32)
    step = torch.tensor([2.0 ** (s - 127) for s in scales.reshape(-1).tolist()], dtype=torch.float64).view(40, 8, 1)
    # each block's max lands in (224, 448]: the smallest scale that fits (all-zero block: 1.0)
    amax = blocks.abs().amax(-1, keepdim=True)
    nz = amax > 0
    assert ((amax / step)[nz] <= 448).all() and ((amax / step)[nz] > 224).all()
    assert (scales.view(40, 8)[~nz.squeeze(-1)] == 127).all()
    # e4m3 round to nearest: half an ulp, 2^-4 relative for normals, 2^-10 * scale for subnormals
    err = (back.view(40, 8, 32) - blocks).abs()
    bound = blocks.abs() * 2.0**-4 + step * 2.0**-10
    assert (err <= bound).all(), float((err - bound).max())
    assert torch.equal(back.view(40, 8, 32)[4, 0], blocks[4, 0])  # 448 * 2^-20 is exact


def test_quantize_matches_reference_rounding_on_exact_grid():
    # values already on the e4m3 grid of their block's scale come back exactly
    packed = rows_mixed(16, seed=11)
    vals = packed[:, :256].clone()
    vals[(vals & 0x7F) == 0x7F] = 0x38  # no NaN codes
    scales = packed[:, 256:].clone()
    scales[(scales < 100) | (scales > 200)] = 130  # finite, and clear of bfloat16's subnormal range
    src = fp8_rows.pack(vals, scales)
    x = fp8_rows.dequantize(src).float()
    again = fp8_rows.dequantize(fp8_rows.quantize(x))
    assert torch.equal(again.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 263, dtype=torch.uint8), r"\[\.\.\., 264\].*got \(3, 263\)"),
    (torch.zeros(3, 264, dtype=torch.int8), "must be uint8, got torch.int8"),
    (torch.zeros(3, 264, dtype=torch.float32), "must be uint8"),
    (torch.tensor(7, dtype=torch.uint8), r"shape \[\.\.\., 264\]"),
    ([[0] * 264], "torch.Tensor"),
])
def test_dequantize_and_unpack_reject_bad_rows(bad, match):
    for fn in (fp8_rows.dequantize, fp8_rows.unpack):
        with pytest.raises(InvalidValuesError, match=match):
            fn(bad)


def test_pack_rejects_bad_inputs():
    v, s = torch.zeros(4, 256, dtype=torch.uint8), torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(InvalidValuesError, match=r"values_e4m3 must have shape \[\.\.\., 256\]"):
        fp8_rows.pack(v[:, :255], s)
    with pytest.raises(InvalidValuesError, match=r"scales_e8m0 must have shape \[\.\.\., 8\]"):
        fp8_rows.pack(v, torch.zeros(4, 9, dtype=torch.uint8))
    with pytest.raises(InvalidValuesError, match="same leading shape"):
        fp8_rows.pack(v, s[:3])
    with pytest.raises(InvalidValuesError, match="values_e4m3 must be torch.uint8 or torch.float8_e4m3fn"):
        fp8_rows.pack(v.float(), s)
    with pytest.raises(InvalidValuesError, match="scales_e8m0 must be"):
        fp8_rows.pack(v, s.view(torch.int8))


def test_quantize_rejects_bad_inputs():
    with pytest.raises(InvalidValuesError, match="floating-point"):
        fp8_rows.quantize(torch.zeros(2, 256, dtype=torch.int32))
    with pytest.raises(InvalidValuesError, match=r"\[\.\.\., 256\]"):
        fp8_rows.quantize(torch.zeros(2, 128))
    with pytest.raises(InvalidValuesError, match="NaN or inf"):
        fp8_rows.quantize(torch.full((1, 256), math.inf))
    with pytest.raises(InvalidValuesError, match="448"):
        fp8_rows.quantize(torch.full((1, 256), 1e300, dtype=torch.float64))
    assert issubclass(InvalidValuesError, EngramStoreError)


@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit():
    packed = torch.cat([rows_every_code_every_edge_scale(), rows_mixed(4096, seed=13)])
    cpu = fp8_rows.dequantize(packed)
    gpu = fp8_rows.dequantize(packed.cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu.view(torch.int16), gpu.cpu().view(torch.int16))
    x = torch.randn(64, 256)
    assert torch.equal(fp8_rows.quantize(x), fp8_rows.quantize(x.cuda()).cpu())
