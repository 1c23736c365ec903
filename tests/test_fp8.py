"""deep_ep_py.fp8: per_token_cast_to_fp8 / per_token_cast_back against the contract's FP8 format.

Bitwise: values and scales equal the brute-force cast in brute_force.py (float32 amax / 448, amax clamped to
>= 1e-4, round_scale = next power of two by exponent bits, ue8m0 = exponent bytes, lowest group lowest byte).

Round trip bound asserted, per element: |x - back(x)| <= 2^-4 * |x| + 2^-10 * scale. e4m3 keeps 3 mantissa
bits, so rounding a normal value is off by at most half an ulp = 2^-4 of its leading power of two (<= 2^-4 |v|);
below e4m3's smallest normal (2^-6) the spacing is 2^-9, so the absolute error is <= 2^-10 in scaled units.
"""

from __future__ import annotations

import pytest
import torch
from brute_force import fp8_cast, round_scale_up_pow2, ue8m0_pack, ue8m0_unpack

from deep_ep_py import fp8

SHAPES = [(1, 128), (7, 512), (33, 1024), (4, 2048), (0, 512)]


def _make_x(num_tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + num_tokens * 131 + hidden)
    x = torch.randn((num_tokens, hidden), generator=gen) * torch.logspace(-3, 3, hidden // 128).repeat_interleave(128)
    if num_tokens > 2:
        x[1, :128] = 0  # an all-zero group: amax clamps to 1e-4
        x[2, 128 : 128 + 128] = 1e-6  # a tiny group, also clamped
    return x.to(dtype)


@pytest.mark.parametrize("num_tokens,hidden", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("round_scale", [False, True])
def test_cast_matches_brute_force(num_tokens, hidden, dtype, round_scale):
    x = _make_x(num_tokens, hidden, dtype)
    values, scales = fp8.per_token_cast_to_fp8(x, round_scale=round_scale)
    want_values, want_scales = fp8_cast(x, round_scale=round_scale)
    assert values.dtype == torch.float8_e4m3fn
    assert values.shape == (num_tokens, hidden)
    assert scales.dtype == torch.float32
    assert scales.shape == (num_tokens, hidden // 128)
    assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
    assert torch.equal(scales.contiguous().view(torch.int32), want_scales.view(torch.int32))
    if round_scale and num_tokens:
        mantissa_bits = scales.contiguous().view(torch.int32) & 0x7FFFFF
        assert bool((mantissa_bits == 0).all()), "round_scale scales must be powers of two"


@pytest.mark.parametrize("num_tokens,hidden", [s for s in SHAPES if s[1] % 512 == 0])
def test_ue8m0_matches_brute_force(num_tokens, hidden):
    x = _make_x(num_tokens, hidden, torch.bfloat16, seed=5)
    values, packed = fp8.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    want_values, want_scales = fp8_cast(x, round_scale=True)
    assert packed.dtype == torch.int32
    assert packed.shape == (num_tokens, hidden // 512)
    assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
    assert torch.equal(packed.contiguous(), ue8m0_pack(want_scales))


def test_ue8m0_byte_order_by_hand():
    """Groups with amax 448 * 2^k get scale 2^k, exponent field 127 + k; group 0 goes in the lowest byte."""
    exponents = [-3, 0, 2, 5, 1, -1, 4, 3]
    x = torch.zeros((1, 128 * len(exponents)))
    for g, k in enumerate(exponents):
        x[0, g * 128] = 448.0 * 2.0**k
    _, packed = fp8.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    want = []
    for w in range(len(exponents) // 4):
        word = sum((127 + exponents[4 * w + j]) << (8 * j) for j in range(4))
        want.append(word - 2**32 if word >= 2**31 else word)
    assert packed.tolist() == [want]
    assert torch.equal(ue8m0_unpack(packed), torch.tensor([[2.0**k for k in exponents]]))


@pytest.mark.parametrize("num_tokens,hidden", SHAPES)
@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("column_major", [False, True])
def test_round_trip_error_bound(num_tokens, hidden, round_scale, column_major):
    x = _make_x(num_tokens, hidden, torch.bfloat16, seed=9)
    values, scales = fp8.per_token_cast_to_fp8(x, round_scale=round_scale)
    if column_major:
        cm = torch.empty((scales.shape[1], scales.shape[0]), dtype=scales.dtype).T
        cm.copy_(scales)
        scales = cm
    back = fp8.per_token_cast_back(values, scales)
    assert back.shape == (num_tokens, hidden)
    assert back.dtype in (torch.float32, torch.bfloat16)
    # Exactly value * scale per group.
    want_back = (values.float().view(num_tokens, hidden // 128, 128) * scales.float().unsqueeze(-1)).view(
        num_tokens, hidden
    )
    assert torch.equal(back.float(), want_back)
    scale_per_elem = scales.float().repeat_interleave(128, dim=1)
    bound = 2.0**-4 * x.float().abs() + 2.0**-10 * scale_per_elem
    err = (back.float() - x.float()).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def test_round_trip_ue8m0_scales():
    x = _make_x(6, 1024, torch.bfloat16, seed=3)
    values, packed = fp8.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    back = fp8.per_token_cast_back(values, packed)
    _, want_scales = fp8_cast(x, round_scale=True)
    want = (values.float().view(6, -1, 128) * want_scales.unsqueeze(-1)).view(6, 1024)
    assert torch.equal(back.float(), want)


def test_group_max_hits_448_and_zero_groups():
    x = _make_x(8, 512, torch.bfloat16, seed=1)
    values, scales = fp8.per_token_cast_to_fp8(x)
    group_max = values.float().abs().view(8, 4, 128).amax(-1)
    nonzero = x.float().abs().view(8, 4, 128).amax(-1) >= 1e-4
    assert bool((group_max[nonzero] == 448.0).all())  # amax / (amax / 448) rounds to 448 exactly
    assert scales[1, 0].item() == pytest.approx(1e-4 / 448, rel=1e-6)  # the all-zero group, clamped
    assert bool((values[1, :128].float() == 0).all())


def test_brute_force_pow2_rounding_is_sane():
    s = torch.tensor([0.25, 0.3, 1.0, 1.0000001, 3e-7, 7.9], dtype=torch.float32)
    assert round_scale_up_pow2(s).tolist() == [0.25, 0.5, 1.0, 2.0, 2.0**-21, 8.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="128"):
        fp8.per_token_cast_to_fp8(torch.zeros(2, 200))
    with pytest.raises(ValueError, match="round_scale"):
        fp8.per_token_cast_to_fp8(torch.zeros(2, 512), round_scale=False, use_ue8m0=True)


@pytest.mark.parametrize("num_cols", [1, 3])
def test_unpack_ue8m0_any_strides(num_cols):
    """Column-major packed scales, as the low-latency dispatch returns them: with one column (hidden 512) torch
    calls the [N, 1] tensor contiguous though its last stride is N, which a byte view of memory cannot take."""
    x = torch.randn(7, 512 * num_cols) * 5
    _, packed = fp8.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    column_major = torch.empty(num_cols, 7, dtype=torch.int32).T
    column_major.copy_(packed)
    assert column_major.stride() == (1, 7)
    assert torch.equal(fp8.unpack_ue8m0(column_major), fp8.unpack_ue8m0(packed))
    assert torch.equal(fp8.unpack_ue8m0(packed), ue8m0_unpack(packed))
