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
def quantize_tile(x, FP8_MAX: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr):
    """act_quant of an fp32 [rows, 128] tile: (values on the e4m3 grid in fp32, per-row scale). The same
    scale and rounding as dsv3.core.fp8.act_quant_reference, NaN included: a row holding a NaN gets a NaN
    scale (as the reference's amax), so the NaN reaches every product of the row (a plain clamp and max
    would turn it into ±FP8_MAX on a GPU and hide it)."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4) / FP8_MAX  # [rows]
    if UE8M0:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    scale = tl.where(tl.sum((x != x).to(tl.int32), axis=1) > 0, float("nan"), scale)
    y = tl.clamp(x / scale[:, None], -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return round_to_fp8_grid(y, EMIN), scale


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST is set only under Triton's CPU interpreter, which multiplies bf16
    operands as their raw uint16 bit patterns; on a GPU the operands go to the tensor cores as is."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def rms_row(x, w, n, eps, AXIS: tl.constexpr = 0):
    """RMS-normed rows: x · rsqrt(Σx²/n + eps) · w over AXIS (a row [D], or rows [R, D] with AXIS 1), fp32 in (masked
    lanes 0), fp32 out. Shared by rms_norm.py and latent.py so that the kv_norm of a cache-free forward and of a
    decode step's fused prologue agree bit for bit."""
    return x * tl.rsqrt(tl.sum(x * x, AXIS, keep_dims=True) / n + eps) * w


@triton.jit
def split_k_gather(acc, acc2, ws_ptr, count_ptr, tile, split, n_tiles,
                   SPLIT_K: tl.constexpr, TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K in one launch: the SPLIT_K programs of an output tile each summed a range of K blocks;
    each writes its fp32 partial (two with TWO: gate and up) to the workspace and counts itself in.
    The last to arrive sums all partials in split order (the result does not depend on which came
    last), resets the tile's counter to 0 for the next launch or graph replay, and returns last=True:
    only it runs the epilogue. Returns (last as a tile mask, acc, acc2)."""
    cell = (tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    plane = n_tiles.to(tl.int64) * BLOCK_M * BLOCK_N
    tl.store(ws_ptr + split * plane + cell, acc)
    if TWO:
        tl.store(ws_ptr + (SPLIT_K + split) * plane + cell, acc2)
    tl.debug_barrier()  # every thread's partial is written before the count says so (the atomic releases them)
    last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for s in tl.static_range(SPLIT_K):
            # .cg: from L2, where the other SMs' partials are, never a stale L1 line
            acc += tl.load(ws_ptr + s * plane + cell, cache_modifier=".cg")
            if TWO:
                acc2 += tl.load(ws_ptr + (SPLIT_K + s) * plane + cell, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + tile, 0)
    # as a [BLOCK_M, BLOCK_N] mask: the interpreter's & of a block with the atomic's scalar is not a bool
    return tl.full((BLOCK_M, BLOCK_N), 1, tl.int1) & last, acc, acc2
