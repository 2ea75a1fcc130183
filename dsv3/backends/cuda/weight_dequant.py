"""FP8 weight -> dense: real = fp8 × scale per 128x128 block, for GPUs without FP8 (sm80, gfx90a)
and for the absorbed attention, which multiplies by wkv_b as a matrix.

The kernel reads the weight as bytes and decodes e4m3 itself: Triton refuses an FP8 tensor on a chip without
FP8 (sm80: "type fp8e4nv not supported in this architecture"), which is exactly where this op runs at load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FP_FUSION

BLOCK = 128
#: exponent bias of the e4m3 flavours: OCP e4m3fn (NaN = S.1111.111) and e4m3fnuz (NaN = 0x80, no -0)
BIAS = {torch.float8_e4m3fn: 7, torch.float8_e4m3fnuz: 8}


@triton.jit
def decode_e4m3(b, BIAS: tl.constexpr, FNUZ: tl.constexpr):
    """int32 bytes -> their e4m3 values in fp32, exactly: (8 + m) · 2^(e - BIAS - 3), subnormals (e = 0)
    m · 2^(-BIAS - 2).
    The power of two is built from its bits (tl.exp2 may approximate)."""
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    p2 = ((tl.maximum(e, 1) - BIAS - 3 + 127) << 23).to(tl.float32, bitcast=True)
    mag = (tl.where(e > 0, 8.0, 0.0) + m) * p2
    value = tl.where(b >= 128, -mag, mag)
    nan = (b == 128) if FNUZ else ((b & 127) == 127)
    return tl.where(nan, float("nan"), value)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, n_nb, n_kb, BIAS: tl.constexpr, FNUZ: tl.constexpr,
                    BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)  # stacked experts share one launch
    bn, bk = tl.program_id(1), tl.program_id(2)
    rn = bn * BLOCK + tl.arange(0, BLOCK)
    rk = bk * BLOCK + tl.arange(0, BLOCK)
    inside = (rn[:, None] < N) & (rk[None, :] < K)
    offs = e * N * K + rn[:, None].to(tl.int64) * K + rk[None, :]
    w = decode_e4m3(tl.load(w_ptr + offs, mask=inside, other=0).to(tl.int32), BIAS, FNUZ)  # w_ptr: the bytes
    s = tl.load(s_ptr + (e * n_nb + bn) * n_kb + bk)
    tl.store(y_ptr + offs, (w * s).to(y_ptr.dtype.element_ty), mask=inside)


def weight_dequant(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w [N, K] or [E, N, K] fp8, scale [(E,) ceil(N/128), ceil(K/128)] fp32 -> dense, same shape."""
    if w.dtype not in BIAS or w.dim() not in (2, 3):
        raise ValueError(f"weight_dequant: expected an e4m3fn or e4m3fnuz [N, K] or [E, N, K] weight, got {w.dtype} "
                         f"{list(w.shape)}")
    n, k = w.shape[-2:]
    want = (*w.shape[:-2], triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"weight_dequant: scale {list(scale.shape)} does not fit weight {list(w.shape)}; expected {list(want)}")
    w, scale = w.contiguous(), scale.float().contiguous()
    y = torch.empty(w.shape, dtype=dtype, device=w.device)
    e = w.shape[0] if w.dim() == 3 else 1
    if y.numel():
        _dequant_kernel[(e, want[-2], want[-1])](w.view(torch.uint8), scale, y, n, k, want[-2], want[-1],
                                                 BIAS=BIAS[w.dtype], FNUZ=w.dtype == torch.float8_e4m3fnuz, BLOCK=BLOCK,
                                                 # 4 warps spilled the decode's temporaries (sm90 ptxas)
                                                 num_warps=8, enable_fp_fusion=FP_FUSION)
    return y


@torch.library.custom_op("dsv3::weight_dequant", mutates_args=())
def weight_dequant_op(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight_dequant(w, scale, dtype)


@weight_dequant_op.register_fake
def _(w, scale, dtype):
    return w.new_empty(w.shape, dtype=dtype)
