"""Activation quantization: per token, per 128 channels, to FP8 with an fp32 scale.

scale = max(amax, 1e-4) / fp8_max (rounded up to a power of two under ue8m0, as V3.1 uses);
q = x / scale, clamped and rounded to nearest even. Reference: dsv3.core.fp8.act_quant_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.fp8 import FP8_EMIN, FP8_MAX
from .jit import quantize_tile
from .launch import FP_FUSION, interpreted

BLOCK = 128


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, stride_xm, n_blocks, FP8_MAX: tl.constexpr, EMIN: tl.constexpr,
                      UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_xm + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    y, scale = quantize_tile(x, FP8_MAX, EMIN, UE8M0)  # [BLOCK_M, BLOCK], [BLOCK_M]
    tl.store(y_ptr + r64 * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(s_ptr + rows * n_blocks + blk, scale, mask=rows < M)


def act_quant(x: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float, ue8m0: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (bf16/fp16/fp32, unit stride in K) -> (q [M, K] fp8, scale [M, ceil(K/128)] fp32), M = prod(...)."""
    if fp8_dtype not in FP8_EMIN:
        raise ValueError(f"act_quant: fp8_dtype {fp8_dtype} is not an e4m3 format; expected one of {list(FP8_EMIN)}")
    if not 0 < fp8_max <= FP8_MAX[fp8_dtype]:
        raise ValueError(f"act_quant: fp8_max={fp8_max} is outside (0, the max of {fp8_dtype}]")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"act_quant: x has dtype {x.dtype}; expected bf16, fp16 or fp32")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n_blocks = triton.cdiv(k, BLOCK)
    y = torch.empty(m, k, dtype=fp8_dtype, device=x.device)
    s = torch.empty(m, n_blocks, dtype=torch.float32, device=x.device)
    if m:
        # a decode step quantizes one row: no idle lanes. The interpreter pays per program, not per lane.
        rows = 1 if m == 1 else 128 if interpreted(x.device) else 16
        _act_quant_kernel[(triton.cdiv(m, rows), n_blocks)](x2, y, s, m, k, x2.stride(0), n_blocks,
                                                            FP8_MAX=float(fp8_max), EMIN=FP8_EMIN[fp8_dtype],
                                                            UE8M0=ue8m0, BLOCK_M=rows, BLOCK=BLOCK,
                                                            enable_fp_fusion=FP_FUSION)
    return y, s


@torch.library.custom_op("dsv3::act_quant", mutates_args=())
def act_quant_op(x: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float, ue8m0: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return act_quant(x, fp8_dtype, fp8_max, ue8m0)


@act_quant_op.register_fake
def _(x, fp8_dtype, fp8_max, ue8m0):
    m, k = x.numel() // x.shape[-1], x.shape[-1]
    return x.new_empty(m, k, dtype=fp8_dtype), x.new_empty(m, (k + BLOCK - 1) // BLOCK, dtype=torch.float32)
