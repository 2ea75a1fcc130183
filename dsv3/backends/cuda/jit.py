"""Triton helpers shared by the kernels of this folder."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_fp8_grid(y, EMIN: tl.constexpr):
    """Round fp32 y (|y| <= the format's max) to the nearest e4m3 value, ties to even.

    The cast to FP8 then only reinterprets an exact value, so the result does not depend on the
    conversion's rounding mode (Triton's CPU interpreter does not carry a round-up into the
    exponent). Adding 2^(e+20) puts y where fp32's own spacing is e4m3's 2^(e-3); the add rounds.
    """
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN)  # below EMIN: the subnormal spacing
    c = ((e + 147) << 23).to(tl.float32, bitcast=True)  # 2^(e + 20)
    a = tl.abs(y)
    r = (a + c) - c
    return tl.where(bits < 0, -r, r)


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST is set only under Triton's CPU interpreter, which multiplies bf16
    operands as their raw uint16 bit patterns; on a GPU the operands go to the tensor cores as is."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def rms_row(x, w, n, eps):
    """One RMS-normed row: x · rsqrt(Σx²/n + eps) · w, fp32 in (masked lanes 0), fp32 out. Shared by rms_norm.py and
    latent.py so that the kv_norm of a cache-free forward and of a decode step's fused prologue agree bit for bit."""
    return x * tl.rsqrt(tl.sum(x * x, 0) / n + eps) * w
