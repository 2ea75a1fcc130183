"""RMSNorm, one row per program: x · rsqrt(mean(x²) + eps) · weight in fp32, rounded once to x's dtype.

The same arithmetic (jit.rms_row) as the kv_norm inside latent.py, so a cache-free forward and the decode
step's fused prologue store the same bits. Reference: dsv3.backends.reference.ReferenceKernels.rms_norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jit import rms_row
from .launch import FP_FUSION


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_row, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + row * stride_row + d, mask=d < D, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + d, rms_row(x, w, D, eps).to(y_ptr.dtype.element_ty), mask=d < D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (unit last stride, rows of one stride: a slice of a projection is fine), weight [D] -> x's shape
    and dtype, contiguous."""
    D = x.shape[-1]
    if tuple(weight.shape) != (D,):
        raise ValueError(f"rms_norm: weight {list(weight.shape)}; expected [{D}] for x {list(x.shape)}")
    rows = x.numel() // D if D else 0
    flat = x.reshape(rows, D) if x.stride(-1) == 1 else x.contiguous().view(rows, D)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows and D:
        _rms_norm_kernel[(rows,)](flat, weight.contiguous(), y, D, flat.stride(0), float(eps),
                                  BLOCK_D=triton.next_power_of_2(D), enable_fp_fusion=FP_FUSION)
    return y


@torch.library.custom_op("dsv3::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)
