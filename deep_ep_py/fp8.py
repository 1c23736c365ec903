"""The FP8 format of the contract: e4m3 values with one float32 scale per token per 128 channels.

scale = max(|x|) / 448 over each group of 128 channels (amax clamped to at least 1e-4), value = x / scale cast
to float8_e4m3fn. round_scale rounds each scale up to a power of two; use_ue8m0 (needs round_scale) stores only
the 8 exponent bits of each scale, four groups to an int32 with the lowest group in the lowest byte.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP8_AMAX_MIN = 1e-4
GROUP_SIZE = 128
UE8M0_GROUPS_PER_INT32 = 4


def round_up_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale, exactly (float32, positive finite inputs)."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale), exponent)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales [..., G] (G a multiple of 4) -> int32 [..., G / 4] of exponent bytes."""
    if scales.shape[-1] % UE8M0_GROUPS_PER_INT32 != 0:
        raise ValueError(f"scales: expected a last dim divisible by 4 for ue8m0 packing, got {tuple(scales.shape)}")
    exponent_bytes = ((scales.float().contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    return exponent_bytes.contiguous().view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., G / 4] of exponent bytes (the lowest byte the first group) -> float32 power-of-two scales [..., G].
    Any strides: the bytes are taken out by shifts, not by viewing memory (a column-major [N, 1] tensor counts as
    contiguous to torch, yet cannot be viewed as bytes)."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=packed.device)
    exponent_bytes = (packed.unsqueeze(-1) >> shifts) & 0xFF
    return (exponent_bytes.flatten(-2) << 23).view(torch.float32)


def per_token_cast_to_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast x [T, H] (any float dtype, H a multiple of 128) to the contract's FP8 format.

    Returns (values float8_e4m3fn [T, H], scales), scales being float32 [T, H / 128], or with use_ue8m0
    int32 [T, H / 512] of packed exponents. Both are row-major; callers that need column-major copy them.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [T, H], got shape {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    if hidden % GROUP_SIZE != 0:
        raise ValueError(f"x: expected hidden to be a multiple of {GROUP_SIZE} for FP8, got {hidden}")
    if use_ue8m0 and not round_scale:
        raise ValueError(
            "use_ue8m0: expected round_scale=True (ue8m0 stores power-of-two scales), got round_scale=False"
        )
    if use_ue8m0 and hidden % (GROUP_SIZE * UE8M0_GROUPS_PER_INT32) != 0:
        raise ValueError(f"x: expected hidden to be a multiple of 512 with use_ue8m0, got {hidden}")
    groups = x.float().view(num_tokens, hidden // GROUP_SIZE, GROUP_SIZE)
    amax = groups.abs().amax(dim=-1).clamp(min=FP8_AMAX_MIN)
    # A tensor divisor, not the scalar 448: on CUDA torch turns division by a scalar into multiplication by its
    # reciprocal, which rounds differently; tensor / tensor is a true division on every device, as in the kernels.
    scales = amax / torch.full_like(amax, FP8_MAX)
    if round_scale:
        scales = round_up_to_power_of_two(scales)
    values = (groups / scales.unsqueeze(-1)).view(num_tokens, hidden).to(torch.float8_e4m3fn)
    if use_ue8m0:
        return values, pack_ue8m0(scales)
    return values, scales


def per_token_cast_back(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of per_token_cast_to_fp8: values float8_e4m3fn [T, H] and scales (float32 [T, H / 128], any
    strides, or int32 [T, H / 512] packed ue8m0) -> float32 [T, H]."""
    if values.dim() != 2:
        raise ValueError(f"values: expected a 2-D tensor [T, H], got shape {tuple(values.shape)}")
    num_tokens, hidden = values.shape
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    if tuple(scales.shape) != (num_tokens, hidden // GROUP_SIZE):
        raise ValueError(f"scales: expected shape {(num_tokens, hidden // GROUP_SIZE)}, got {tuple(scales.shape)}")
    groups = values.float().view(num_tokens, hidden // GROUP_SIZE, GROUP_SIZE)
    return (groups * scales.float().unsqueeze(-1)).view(num_tokens, hidden)
