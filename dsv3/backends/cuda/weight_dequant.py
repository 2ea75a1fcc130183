"""FP8 weight -> dense: real = fp8 × scale per 128x128 block, for GPUs without FP8 (sm80, gfx90a)
and for the absorbed attention, which multiplies by wkv_b as a matrix."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, n_nb, n_kb, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)  # stacked experts share one launch
    bn, bk = tl.program_id(1), tl.program_id(2)
    rn = bn * BLOCK + tl.arange(0, BLOCK)
    rk = bk * BLOCK + tl.arange(0, BLOCK)
    inside = (rn[:, None] < N) & (rk[None, :] < K)
    offs = e * N * K + rn[:, None].to(tl.int64) * K + rk[None, :]
    w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (e * n_nb + bn) * n_kb + bk)
    tl.store(y_ptr + offs, (w * s).to(y_ptr.dtype.element_ty), mask=inside)


def weight_dequant(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w [N, K] or [E, N, K] fp8, scale [(E,) ceil(N/128), ceil(K/128)] fp32 -> dense, same shape."""
    if w.element_size() != 1 or w.dim() not in (2, 3):
        raise ValueError(f"weight_dequant: expected an FP8 [N, K] or [E, N, K] weight, got {w.dtype} {list(w.shape)}")
    n, k = w.shape[-2:]
    want = (*w.shape[:-2], triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"weight_dequant: scale {list(scale.shape)} does not fit weight {list(w.shape)}; expected {list(want)}")
    w, scale = w.contiguous(), scale.float().contiguous()
    y = torch.empty(w.shape, dtype=dtype, device=w.device)
    e = w.shape[0] if w.dim() == 3 else 1
    if y.numel():
        _dequant_kernel[(e, want[-2], want[-1])](w, scale, y, n, k, want[-2], want[-1], BLOCK=BLOCK)
    return y


@torch.library.custom_op("dsv3::weight_dequant", mutates_args=())
def weight_dequant_op(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight_dequant(w, scale, dtype)


@weight_dequant_op.register_fake
def _(w, scale, dtype):
    return w.new_empty(w.shape, dtype=dtype)
