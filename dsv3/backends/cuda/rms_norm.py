"""RMSNorm: x · rsqrt(mean(x²) + eps) · weight in fp32, rounded once to x's dtype; a program per
launch.rows_per_program rows (one on a GPU).

The same arithmetic (jit.rms_row) as the kv_norm inside latent.py, so a cache-free forward and the decode
step's fused prologue store the same bits. Reference: dsv3.backends.reference.ReferenceKernels.rms_norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jit import rms_row
from .launch import FP_FUSION, rows_per_program


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, D, stride_row, eps, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    inside = (row < n_rows) & (d < D)
    x = tl.load(x_ptr + row * stride_row + d, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + d, rms_row(x, w, D, eps, 1).to(y_ptr.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, rows_per_prog: int | None = None) -> torch.Tensor:
    """x [..., D] (unit last stride, rows of one stride: a slice of a projection is fine), weight [D] -> x's shape
    and dtype, contiguous. `rows_per_prog` overrides the device's rows per program (a power of two)."""
    D = x.shape[-1]
    if tuple(weight.shape) != (D,):
        raise ValueError(f"rms_norm: weight {list(weight.shape)}; expected [{D}] for x {list(x.shape)}")
    rows = x.numel() // D if D else 0
    flat = x.reshape(rows, D) if x.stride(-1) == 1 else x.contiguous().view(rows, D)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows and D:
        per = rows_per_program(x.device, rows_per_prog)
        _rms_norm_kernel[(triton.cdiv(rows, per),)](flat, weight.contiguous(), y, rows, D, flat.stride(0), float(eps),
                                                   BLOCK_D=triton.next_power_of_2(D), ROWS=per,
                                                   enable_fp_fusion=FP_FUSION)
    return y


@torch.library.custom_op("dsv3::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)
