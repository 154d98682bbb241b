"""Hand-computed checks of the quantized formats and the reference round trips."""

from __future__ import annotations

import pytest
import torch

from dsv4.model import quant

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]

E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def e8m0(*exponents: int) -> torch.Tensor:
    return torch.tensor([e + 127 for e in exponents], dtype=torch.uint8).view(
        torch.float8_e8m0fnu)


# --- UE8M0 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_ue8m0_bytes_are_exponents(device):
    raw = torch.tensor([127, 120, 0, 128, 254], dtype=torch.uint8, device=device)
    values = quant.ue8m0_to_float(raw).cpu()
    assert values.dtype == torch.float32
    assert values[0].item() == 1.0
    assert values[1].item() == 2.0 ** -7
    assert values[2].item() == 2.0 ** -127
    assert values[3].item() == 2.0
    assert values[4].item() == 2.0 ** 127


def test_ue8m0_accepts_e8m0_dtype():
    values = quant.ue8m0_to_float(e8m0(0, -3, 5))
    assert values.tolist() == [1.0, 0.125, 32.0]


def test_ue8m0_nan_byte_rejected_with_name():
    raw = torch.tensor([127, 255], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.wq_a\.scale.*255"):
        quant.ue8m0_to_float(raw, name="layers.0.attn.wq_a.scale")


def test_ue8m0_rejects_float_dtype():
    with pytest.raises(TypeError, match="float8_e8m0fnu or uint8"):
        quant.ue8m0_to_float(torch.ones(2))


# --- FP8 e4m3 ------------------------------------------------------------------------------

def test_fp8_decode_hand_made_bytes():
    # sign | 4 exponent bits (bias 7) | 3 mantissa bits
    raw = torch.tensor([[0x38, 0x40, 0x7E, 0x01, 0xB8, 0x3C, 0x00, 0x08]], dtype=torch.uint8)
    weight = raw.view(torch.float8_e4m3fn)
    values = quant.dequantize_fp8_blocks(weight, e8m0(0).view(1, 1))
    expected = [1.0, 2.0, 448.0, 2.0 ** -9, -1.0, 1.5, 0.0, 2.0 ** -6]
    assert values[0].tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_block_scales_applied_per_tile(device):
    # 130 x 260: 2 x 3 blocks, the last row and column blocks partial.
    weight = torch.ones(130, 260, device=device).to(torch.float8_e4m3fn)
    scale = e8m0(0, 1, 2, -1, -2, 3).view(2, 3).to(device)
    values = quant.dequantize_fp8_blocks(weight, scale, torch.bfloat16).cpu()
    assert values.shape == (130, 260)
    assert values.dtype == torch.bfloat16
    assert values[0, 0].item() == 1.0
    assert values[127, 128].item() == 2.0
    assert values[0, 259].item() == 4.0
    assert values[128, 0].item() == 0.5
    assert values[129, 255].item() == 0.25
    assert values[129, 256].item() == 8.0


def test_fp8_scale_shape_checked():
    weight = torch.ones(130, 260).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        quant.dequantize_fp8_blocks(weight, e8m0(0, 0).view(1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_quantize_round_trip_exact_on_representable(device):
    # Each tile contains e4m3 values times a power of two, so quantization must be lossless.
    torch.manual_seed(0)
    codes = torch.randint(0, 0x7F, (200, 300), dtype=torch.uint8)  # positive finite e4m3
    base = codes.view(torch.float8_e4m3fn).float()
    base[0, 0] = 448.0
    base[128, 128] = 448.0
    base[0, 256] = 448.0
    base[128, 0] = 448.0
    base[128, 256] = 448.0
    base[0, 128] = 448.0
    signs = torch.where(torch.rand(200, 300) < 0.5, -1.0, 1.0)
    factors = torch.tensor([[2.0 ** -5, 1.0, 2.0 ** 3], [2.0 ** 2, 2.0 ** -8, 0.5]])
    weight = base * signs * factors.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    quantized, scale = quant.quantize_fp8_blocks(weight.to(device))
    assert quantized.dtype == torch.float8_e4m3fn
    assert scale.dtype == torch.float8_e8m0fnu
    assert scale.shape == (2, 3)
    assert quant.ue8m0_to_float(scale).cpu().equal(factors)
    assert torch.equal(quant.dequantize_fp8_blocks(quantized, scale).cpu(), weight)


def test_fp8_block_scale_rounds_up_to_power_of_two():
    weight = torch.zeros(128, 128)
    weight[3, 5] = 449.0  # amax/448 is just above 1, so the scale is 2
    _, scale = quant.quantize_fp8_blocks(weight)
    assert quant.ue8m0_to_float(scale).item() == 2.0
    weight[3, 5] = 448.0  # exactly 1: no rounding up
    _, scale = quant.quantize_fp8_blocks(weight)
    assert quant.ue8m0_to_float(scale).item() == 1.0
    weight[3, 5] = 100.0  # 100/448 = 0.223 -> 0.25
    _, scale = quant.quantize_fp8_blocks(weight)
    assert quant.ue8m0_to_float(scale).item() == 0.25


def test_fp8_zero_block_gets_smallest_scale():
    _, scale = quant.quantize_fp8_blocks(torch.zeros(4, 4))
    assert scale.view(torch.uint8).item() == 0


# --- FP4 e2m1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_fp4_full_code_table(device):
    # Byte j contains code 2j in the low nibble and code 2j+1 in the high nibble.
    packed = torch.tensor([[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]],
                          dtype=torch.uint8, device=device).view(torch.int8)
    values = quant.unpack_fp4(packed).cpu()
    assert values.shape == (1, 16)
    assert values[0].tolist() == E2M1_TABLE
    assert torch.signbit(values[0, 8]).item()  # code 8 is -0.0


def test_fp4_nibble_order():
    packed = torch.tensor([[0x71]], dtype=torch.uint8).view(torch.int8)  # low 1 -> 0.5, high 7 -> 6
    assert quant.unpack_fp4(packed)[0].tolist() == [0.5, 6.0]
    packed = torch.tensor([[0x1F]], dtype=torch.uint8).view(torch.int8)  # low 15 -> -6, high 1
    assert quant.unpack_fp4(packed)[0].tolist() == [-6.0, 0.5]


def test_fp4_dequantize_uses_group_scale():
    packed = torch.full((2, 32), 0x22, dtype=torch.uint8).view(torch.int8)  # every value 1.0
    scale = e8m0(0, 3, -1, 1).view(2, 2)
    values = quant.dequantize_fp4(packed, scale, torch.bfloat16)
    assert values.shape == (2, 64)
    assert values[0, 0].item() == 1.0
    assert values[0, 31].item() == 1.0
    assert values[0, 32].item() == 8.0
    assert values[1, 31].item() == 0.5
    assert values[1, 63].item() == 2.0


@pytest.mark.parametrize("device", DEVICES)
def test_fp4_quantize_round_trip_exact_on_representable(device):
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (8, 64))
    table = torch.tensor(E2M1_TABLE)
    values = table[codes]
    values[:, 0] = 6.0  # make amax 6 in every group so the scale is exactly the factor
    values[:, 32] = -6.0
    factors = torch.tensor([2.0 ** -3, 4.0]).repeat_interleave(32)
    weight = values * factors
    packed, scale = quant.quantize_fp4(weight.to(device))
    assert packed.dtype == torch.int8
    assert packed.shape == (8, 32)
    assert scale.shape == (8, 2)
    assert torch.equal(quant.dequantize_fp4(packed, scale).cpu(), weight)


@pytest.mark.parametrize("device", DEVICES)
def test_fp4_ties_round_to_even(device):
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    block = torch.cat([midpoints, torch.zeros(24), torch.tensor([6.0])]).to(device)
    rounded = quant.fp4_round_trip(block).cpu()
    assert rounded[:7].tolist() == expected
    negative = quant.fp4_round_trip(-block).cpu()
    assert negative[:7].tolist() == [-v for v in expected]


def test_fp4_rounds_to_nearest_off_tie():
    x = torch.zeros(32)
    x[:6] = torch.tensor([0.26, 0.74, 2.4, 2.6, 4.9, 5.1])
    x[31] = 6.0
    assert quant.fp4_round_trip(x)[:6].tolist() == [0.5, 0.5, 2.0, 3.0, 4.0, 6.0]


def test_fp4_quantize_saturates():
    # amax 6.2 gives scale 2 (6.2/6 rounds up), so 6.2/2 = 3.1 rounds to 3 and back to 6.
    weight = torch.zeros(1, 32)
    weight[0, 0] = 6.2
    weight[0, 1] = -11.9  # amax is now 11.9 -> scale 2 -> -5.95 -> -6 -> -12
    packed, scale = quant.quantize_fp4(weight)
    assert quant.ue8m0_to_float(scale).item() == 2.0
    values = quant.dequantize_fp4(packed, scale)
    assert values[0, 0].item() == 6.0
    assert values[0, 1].item() == -12.0


def test_fp4_codes_saturate_above_six():
    codes = quant.round_to_e2m1_codes(torch.tensor([7.0, 100.0, -8.0]))
    assert codes.tolist() == [7, 7, 15]


def test_fp4_round_trip_tiny_block_uses_floor():
    x = torch.zeros(32)
    assert quant.fp4_round_trip(x).equal(x)


# --- FP8 activation round trip -------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_fp8_round_trip_scale_and_rounding(device):
    x = torch.zeros(2, 8)
    x[0, :4] = torch.tensor([448.0, 1.0, 17.0, -3.0])  # scale 1: 17 rounds to 16 (ties even)
    # amax/448 = 2.01 -> scale 4. Then 900/4 = 225 -> 224, 2^-9/4 is below half the smallest
    # subnormal (2^-9) -> 0, and 1.5 * 2^-9 ties between subnormal codes 1 and 2 -> code 2.
    x[1, :4] = torch.tensor([900.0, 2.0 ** -9, 1.5 * 2.0 ** -7, 0.0])
    out = quant.fp8_round_trip(x.to(device), block=4).cpu()
    assert out[0, :4].tolist() == [448.0, 1.0, 16.0, -3.0]
    assert out[1, :4].tolist() == [896.0, 0.0, 2.0 ** -6, 0.0]
    assert out[0, 4:].tolist() == [0.0] * 4  # all-zero block stays zero


def test_fp8_round_trip_keeps_dtype_and_shape():
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    out = quant.fp8_round_trip(x, block=64)
    assert out.dtype == torch.bfloat16
    assert out.shape == x.shape
    assert torch.allclose(out.float(), x.float(), rtol=0.07, atol=1e-3)


def test_fp8_round_trip_rejects_partial_block():
    with pytest.raises(ValueError, match="multiple of the block size 64"):
        quant.fp8_round_trip(torch.zeros(100), block=64)


def test_fp8_quantize_activation_scales():
    x = torch.full((1, 256), 0.5)
    x[0, 128:] = 1000.0
    q, scale = quant.fp8_quantize_activation(x)
    assert scale.tolist() == [[2.0 ** -9, 4.0]]  # 0.5/448 -> 2^-9; 1000/448 -> 4
    assert q[0, 0].item() == 256.0
    assert q[0, 200].item() == 256.0  # 1000/4 = 250 rounds to 256 in e4m3


# --- Hadamard ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_four_dims_by_hand(device):
    # H4 rows: ++++, +-+-, ++--, +--+, divided by 2.
    out = quant.hadamard(torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)).cpu()
    assert out.tolist() == [5.0, -1.0, -2.0, 0.0]


def test_hadamard_is_orthogonal_involution():
    eye = torch.eye(128, dtype=torch.float64)
    matrix = quant.hadamard(eye.float()).double()
    assert torch.allclose(matrix @ matrix.T, eye, atol=1e-6)
    assert torch.allclose(matrix, matrix.T)
    x = torch.randn(3, 7, 128)
    assert torch.allclose(quant.hadamard(quant.hadamard(x)), x, atol=1e-5)


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        quant.hadamard(torch.zeros(2, 96))
