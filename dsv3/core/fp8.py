"""FP8 format facts and block-scale arithmetic: the one place loading, conversion, the backends
and the demo writer take them from.

Released weights are float8_e4m3fn with an fp32 `weight_scale_inv` per 128x128 block; despite
the name it is the multiplier: real = fp8 * scale. Edge blocks are partial (576 rows -> 5 blocks).

e4m3fn (OCP, NVIDIA, gfx950) and e4m3fnuz (MI300's gfx94x) share the bit layout, but fnuz's exponent
bias is 8 instead of 7: the same byte reads as half the value, so converting keeps the bytes and
doubles the block scale. Two fn bytes need care: 0x80 is -0 in fn but NaN in fnuz (it becomes 0x00),
and 0x7F/0xFF are NaN in fn but ±240 in fnuz (reported, never mapped silently).
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
FP8_EMIN = {torch.float8_e4m3fn: -6, torch.float8_e4m3fnuz: -7}  # smallest normal exponent
FP8_DTYPES = tuple(FP8_MAX)
#: the raw bytes that are NaN in each format (there is no Inf in either)
NAN_BYTES = {torch.float8_e4m3fn: (b"\x7f", b"\xff"), torch.float8_e4m3fnuz: (b"\x80",)}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def scale_shape(shape: tuple[int, ...] | torch.Size, block: int = BLOCK) -> tuple[int, int]:
    n, k = shape[-2], shape[-1]
    return math.ceil(n / block), math.ceil(k / block)


def expand_scale(scale: torch.Tensor, n: int, k: int, block: int = BLOCK) -> torch.Tensor:
    """[ceil(n/b), ceil(k/b)] -> [n, k], each block's scale repeated over its block."""
    return scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [N, K] * block scale, computed in fp32 and rounded once to `dtype`."""
    n, k = weight.shape
    if tuple(scale.shape) != scale_shape(weight.shape):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)}; "
                         f"expected {scale_shape(weight.shape)}")
    out = weight.float()  # one fp32 buffer, scaled in place block by block: no [n, k] scale map
    scale = scale.float().to(out.device)
    n0, k0 = n - n % BLOCK, k - k % BLOCK  # the whole blocks broadcast; the partial edges are small
    if n0 and k0:
        out[:n0, :k0].view(n0 // BLOCK, BLOCK, k0 // BLOCK, BLOCK).mul_(scale[: n0 // BLOCK, None, : k0 // BLOCK, None])
    if k0 < k:
        out[:, k0:].mul_(expand_scale(scale[:, -1:], n, k - k0))
    if n0 < n and k0:
        out[n0:, :k0].mul_(expand_scale(scale[-1:, : k0 // BLOCK], n - n0, k0))
    return out if dtype == torch.float32 else out.to(dtype)


def quantize(weight: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a [N, K] weight: scale = amax/max per 128x128 block (edge blocks zero-padded)."""
    n, k = weight.shape
    sn, sk = scale_shape(weight.shape)
    padded = torch.zeros(sn * BLOCK, sk * BLOCK, dtype=torch.float32)
    padded[:n, :k] = weight.float()
    blocks = padded.view(sn, BLOCK, sk, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX[fp8_dtype]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX[fp8_dtype], FP8_MAX[fp8_dtype])
    q = q.view(sn * BLOCK, sk * BLOCK)[:n, :k].to(fp8_dtype)
    return q.contiguous(), scale.contiguous()


def act_quant_reference(
    x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn, block: int = BLOCK, ue8m0: bool = False,
    fp8_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, per 128 channels: scale = max(amax, 1e-4) / fp8_max (rounded up to 2^k under ue8m0).

    x [M, K] -> (fp8 [M, K], scale fp32 [M, ceil(K/128)]).
    """
    m, k = x.shape
    fmax = fp8_max if fp8_max is not None else FP8_MAX[fp8_dtype]
    nb = math.ceil(k / block)
    padded = torch.zeros(m, nb * block, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    blocks = padded.view(m, nb, block)
    amax = blocks.abs().amax(-1).clamp(min=1e-4)
    scale = amax / fmax
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[..., None]).clamp(-fmax, fmax).view(m, nb * block)[:, :k].to(fp8_dtype)
    return q, scale


# ---- e4m3fn <-> e4m3fnuz ----------------------------------------------------------------------------
def nan_count(weight: torch.Tensor) -> int:
    """NaN bytes in an FP8 tensor of either flavour."""
    raw = weight.contiguous().view(torch.uint8).numpy().tobytes()
    return sum(raw.count(b) for b in NAN_BYTES[weight.dtype])


def fn_to_fnuz(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(e4m3fn weight, scale) -> (e4m3fnuz weight, 2 * scale); raises ValueError on fn NaN bytes."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"expected float8_e4m3fn, got {weight.dtype}")
    nans = nan_count(weight)
    if nans:
        raise ValueError(f"{nans} NaN bytes (0x7F/0xFF) in an e4m3fn weight; they have no fnuz equivalent")
    b = weight.view(torch.uint8)
    b = torch.where(b == 0x80, torch.zeros_like(b), b)  # fn -0 would be fnuz NaN
    return b.view(torch.float8_e4m3fnuz), (None if scale is None else scale.float() * 2)


def fnuz_to_fn(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(e4m3fnuz weight, scale) -> (e4m3fn weight, scale / 2): the inverse of fn_to_fnuz; raises on fnuz NaN (0x80)."""
    if weight.dtype != torch.float8_e4m3fnuz:
        raise ValueError(f"expected float8_e4m3fnuz, got {weight.dtype}")
    nans = nan_count(weight)
    if nans:
        raise ValueError(f"{nans} NaN bytes (0x80) in an e4m3fnuz weight")
    return weight.view(torch.uint8).view(torch.float8_e4m3fn), (None if scale is None else scale.float() / 2)


def to_format(weight: torch.Tensor, scale: torch.Tensor | None, fp8_dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same real values in the FP8 flavour a GPU computes in (bytes kept, scale doubled or halved)."""
    if weight.dtype == fp8_dtype:
        return weight, scale
    if fp8_dtype == torch.float8_e4m3fnuz:
        return fn_to_fnuz(weight, scale)
    return fnuz_to_fn(weight, scale)
