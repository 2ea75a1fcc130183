"""Interleaved rotary embedding in one launch (the reference is ~5 ops through complex numbers).

Pairs (x0, x1), (x2, x3), ... of each head rotate by one angle per position:
y0 = x0·cos - x1·sin, y1 = x0·sin + x1·cos, in fp32, stored in x's dtype. Reference:
dsv3.backends.reference.ReferenceKernels.rope.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FP_FUSION, rows_per_program


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, H, stride_row, stride_h, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr):
    # a row is one (batch, position): every head shares its angles; a program takes ROWS of them
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None, None]  # [ROWS, 1, 1]
    h = tl.arange(0, BLOCK_H)[None, :, None]
    p = tl.arange(0, BLOCK_P)[None, None, :]  # pair index
    here = (row < n_rows) & (p < HALF)
    inside = here & (h < H)
    src = x_ptr + row * stride_row + h * stride_h + 2 * p
    x0 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=inside, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + row * HALF + p, mask=here, other=0.0)
    s = tl.load(sin_ptr + row * HALF + p, mask=here, other=0.0)
    dst = y_ptr + row * H * 2 * HALF + h * 2 * HALF + 2 * p
    tl.store(dst, (x0 * c - x1 * s).to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(dst + 1, (x0 * s + x1 * c).to(y_ptr.dtype.element_ty), mask=inside)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows_per_prog: int | None = None) -> torch.Tensor:
    """x [B, S, H, D] (unit stride in D, rows of one stride: a slice of a projection is fine), cos/sin
    [B, S, D/2] fp32 -> contiguous [B, S, H, D] in x's dtype. `rows_per_prog`: as rms_norm's."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: x {list(x.shape)} must be [B, S, H, D] with D even")
    B, S, H, D = x.shape
    if tuple(cos.shape) != (B, S, D // 2) or cos.shape != sin.shape:
        raise ValueError(f"rope: cos {list(cos.shape)} / sin {list(sin.shape)} must be [{B}, {S}, {D // 2}]")
    if x.stride(-1) != 1 or x.stride(0) != S * x.stride(1):
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    y = torch.empty(B, S, H, D, dtype=x.dtype, device=x.device)
    if y.numel():
        per = rows_per_program(x.device, rows_per_prog)
        _rope_kernel[(triton.cdiv(B * S, per),)](x, cos, sin, y, B * S, H, x.stride(1), x.stride(2), HALF=D // 2,
                                                 BLOCK_H=triton.next_power_of_2(H),
                                                 BLOCK_P=triton.next_power_of_2(D // 2), ROWS=per,
                                                 enable_fp_fusion=FP_FUSION)
    return y


@torch.library.custom_op("dsv3::rope", mutates_args=())
def rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope(x, cos, sin)


@rope_op.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)
