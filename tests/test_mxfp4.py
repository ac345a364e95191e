import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss import mxfp4

LUT = mxfp4.E2M1_VALUES


def block(values, dtype=torch.float32):
    """A 32-value block: `values` first, zeros after."""
    vals = list(values) + [0.0] * (32 - len(values))
    return torch.tensor(vals, dtype=dtype)


def codes(blocks):
    return mxfp4.unpack_nibbles(blocks).flatten().tolist()


def test_nibble_order_low_is_even():
    x = block([1.0, 6.0]) * 1.0  # amax 6 -> exponent floor(log2 6) - 2 = 0
    blocks, scales = mxfp4.quantize(x)
    assert scales.tolist() == [127]
    assert blocks[0, 0].item() == (7 << 4) | 2  # element 0 (1.0, code 2) low, element 1 (6.0, code 7) high


def test_hand_computed_block():
    # amax 3.0 -> floor(log2 3) = 1 -> shared exponent -1 -> scale 2^-1, byte 126.
    x = block([3.0, -0.75, 0.3, 0.125, -1.1])
    blocks, scales = mxfp4.quantize(x)
    assert scales.tolist() == [126]
    # scaled: 6, -1.5, 0.6, 0.25, -2.2 -> codes 7, 8|3, 1, 0 (tie 0.25 -> 0, even), 8|4
    assert codes(blocks)[:5] == [7, 11, 1, 0, 12]
    assert mxfp4.dequantize(blocks, scales, torch.float32)[:5].tolist() == [3.0, -0.75, 0.25, 0.0, -1.0]


@pytest.mark.parametrize("value, code", [
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),  # ties go to even codes
    (0.26, 1), (0.74, 1), (1.26, 3), (4.9, 6), (5.1, 7),
])
def test_ties_to_even(value, code):
    x = block([value, 6.0])  # 6.0 pins the scale to 2^0
    blocks, scales = mxfp4.quantize(x)
    assert scales.item() == 127
    assert codes(blocks)[0] == code


def test_saturation_at_six():
    # amax 7.5 -> floor(log2 7.5) = 2 -> scale 2^0: 7.5 clips to 6 under the OCP rule.
    x = block([7.5, -7.9])
    blocks, scales = mxfp4.quantize(x)
    assert scales.item() == 127
    assert mxfp4.dequantize(blocks, scales, torch.float32)[:2].tolist() == [6.0, -6.0]
    # The ceil rule never clips: 2^ceil(log2(7.9 / 6)) = 2.
    blocks, scales = mxfp4.quantize(x, rule="ceil")
    assert scales.item() == 128
    assert mxfp4.dequantize(blocks, scales, torch.float32)[:2].tolist() == [8.0, -8.0]


def test_all_zero_block_gets_smallest_scale():
    blocks, scales = mxfp4.quantize(torch.zeros(64))
    assert scales.tolist() == [0, 0]
    assert blocks.eq(0).all()
    assert mxfp4.dequantize(blocks, scales, torch.float32).eq(0).all()


def test_negative_zero_keeps_its_sign():
    x = block([-0.0, 4.0])
    out = mxfp4.dequantize(*mxfp4.quantize(x), torch.float32)
    assert math.copysign(1.0, out[0].item()) == -1.0


def test_nan_sets_scale_ff_and_dequantizes_to_nan():
    x = torch.ones(64)
    x[40] = float("nan")
    blocks, scales = mxfp4.quantize(x)
    assert scales.tolist() == [127 - 2, 0xFF]
    out = mxfp4.dequantize(blocks, scales, torch.float32)
    assert out[:32].eq(1.0).all() and out[32:].isnan().all()


def test_e8m0_range_extremes():
    huge = block([2.0 ** 127 * 6], torch.float64)  # exponent 129 - 2 = 127 -> byte 254
    blocks, scales = mxfp4.quantize(huge)
    assert scales.item() == 254
    assert mxfp4.dequantize(blocks, scales, torch.float64)[0].item() == 2.0 ** 127 * 6
    inf = block([float("inf"), 1.0])  # clamps to the largest scale, then saturates
    blocks, scales = mxfp4.quantize(inf)
    assert scales.item() == 254 and codes(blocks)[0] == 7
    tiny = block([2.0 ** -140, 2.0 ** -149])  # below the smallest scale: clamp to byte 0
    blocks, scales = mxfp4.quantize(tiny)
    assert scales.item() == 0
    assert mxfp4.dequantize(blocks, scales, torch.float32)[:2].eq(0).all()
    smallest = block([2.0 ** -127 * 4])  # exactly 4 * 2^-127: representable with byte 0
    blocks, scales = mxfp4.quantize(smallest)
    assert scales.item() == 0 and codes(blocks)[0] == 6


def test_dequantize_every_byte_and_scale():
    byte_values = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    for s in (0, 1, 100, 127, 130, 254):
        scales = torch.full((16,), s, dtype=torch.uint8)
        out = mxfp4.dequantize(byte_values, scales, torch.float64).reshape(256, 2)
        for b in range(256):
            assert out[b, 0].item() == LUT[b & 15] * 2.0 ** (s - 127)
            assert out[b, 1].item() == LUT[b >> 4] * 2.0 ** (s - 127)


def test_dequantized_values_are_exact_in_bf16():
    blocks = torch.randint(0, 256, (8, 4, 16), dtype=torch.uint8)
    scales = torch.randint(100, 150, (8, 4), dtype=torch.uint8)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.bfloat16).double(),
                       mxfp4.dequantize(blocks, scales, torch.float64))


def test_shapes_and_errors():
    blocks, scales = mxfp4.quantize(torch.randn(3, 5, 64))
    assert blocks.shape == (3, 5, 2, 16) and scales.shape == (3, 5, 2)
    assert mxfp4.dequantize(blocks, scales).shape == (3, 5, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.randn(33))
    with pytest.raises(ValueError, match="rule"):
        mxfp4.quantize(torch.randn(32), rule="round")
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(blocks, scales[..., :1])


finite = st.floats(min_value=-(2.0 ** 100), max_value=2.0 ** 100, allow_nan=False, allow_subnormal=True, width=32)


@settings(max_examples=300, deadline=None)
@given(st.lists(finite, min_size=32, max_size=32), st.sampled_from(mxfp4.RULES))
def test_dequantize_quantize_is_nearest_representable(values, rule):
    x = torch.tensor(values, dtype=torch.float32)
    blocks, scales = mxfp4.quantize(x, rule=rule)
    got = mxfp4.dequantize(blocks, scales, torch.float64)
    grid = torch.tensor(LUT, dtype=torch.float64) * 2.0 ** (scales.item() - 127)
    best = (x.double()[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.equal((x.double() - got).abs(), best)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=16, max_size=16), st.integers(0, 254), st.sampled_from(mxfp4.RULES))
def test_requantizing_dequantized_is_identity(byte_list, scale, rule):
    blocks = torch.tensor(byte_list, dtype=torch.uint8)[None]
    scales = torch.tensor([scale], dtype=torch.uint8)
    x = mxfp4.dequantize(blocks, scales, torch.float64)
    again = mxfp4.dequantize(*mxfp4.quantize(x, rule=rule), torch.float64)
    assert torch.equal(again, x) or (x.isnan().any() and again.isnan().any())
