"""FP8 block-scale arithmetic shared by loading, conversion and the demo writer.

Released weights are float8_e4m3fn with an fp32 `weight_scale_inv` per 128x128 block; despite
the name it is the multiplier: real = fp8 * scale. Edge blocks are partial (576 rows -> 5 blocks).
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
FP8_DTYPES = tuple(FP8_MAX)


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
    out = weight.float() * expand_scale(scale.float(), n, k)
    return out.to(dtype)


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
