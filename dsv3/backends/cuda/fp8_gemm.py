"""Block-scaled FP8 GEMM: C = (A · a_scale) (B · b_scale)ᵀ with fp32 accumulation.

A [M, K] FP8 with per-token-per-128 scales [M, ceil(K/128)] (from act_quant); B [N, K] FP8 with
128x128 block scales [ceil(N/128), ceil(K/128)] (the checkpoint's weight_scale_inv). BLOCK_K is
128, so every K step multiplies its partial product by exactly one scale of A's row and one of
B's block row. M, N, K need not be multiples of anything (576, 1536+64 kinds of dims).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.fp8 import FP8_EMIN, FP8_MAX
from .jit import dot, quantize_tile, split_k_gather
from .launch import (
    FP_FUSION,
    MAX_SPLIT_TILES,
    GemmConfig,
    check_target,
    fit_registers,
    gemm_config,
    interpreted,
    split_k,
)

BLOCK_K = 128


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, n_kb,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     QUANT_A: tl.constexpr = False, FP8_MAX: tl.constexpr = 1.0, EMIN: tl.constexpr = 0,
                     UE8M0: tl.constexpr = False, b2_ptr=None, b2s_ptr=None, SWIGLU: tl.constexpr = False,
                     r_ptr=None, RESIDUAL: tl.constexpr = False, ws_ptr=None, count_ptr=None, kb_per_split=0,
                     SPLIT_K: tl.constexpr = 1, SCALED: tl.constexpr = True, UPCAST: tl.constexpr = False):
    """QUANT_A: a_ptr holds the bf16/fp32 activation itself and each K step quantizes its [BLOCK_M, 128]
    tile as act_quant would (same scale, same rounding), so a decode-sized linear is one launch.
    SCALED False: B (and B2) are 16-bit weights in A's dtype, no scales (as_ptr/bs_ptr unread): the BF16 mode's
    decode linears with their SwiGLU and residual epilogues (bf16_linear, bf16_swiglu); UPCAST under the
    interpreter only (jit.dot).
    FP8_MAX/EMIN/UE8M0 are read only with QUANT_A (the caller passes the format's, from core/fp8.py).
    SWIGLU: a second weight b2 (same shape and scales layout) and C = silu(A·Bᵀ) · (A·B2ᵀ), the gate and up
    projections of an MLP in one pass over A. RESIDUAL: C = A·Bᵀ + R (R [M, N] in C's dtype), one rounding.
    SPLIT_K > 1: program (tile, s) sums K blocks s·kb_per_split .. and the tile's last program adds the
    partials up (jit.split_k_gather): a small-M GEMM keeps every SM reading weights."""
    # grouped tile order: GROUP_M row tiles sweep the same B columns while they are in L2
    pid, split = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kb_lo = split * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, n_kb) if SPLIT_K > 1 else n_kb
    rk = tl.arange(0, BLOCK_K)
    in_m, in_n = rm < M, rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + kb_lo * BLOCK_K + rk[None, :]
    b_off = rn[None, :].to(tl.int64) * K + kb_lo * BLOCK_K + rk[:, None]  # [BLOCK_K, BLOCK_N] view of B rows
    as_ptrs = as_ptr + rm.to(tl.int64) * n_kb
    bs_off = (rn // 128) * n_kb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        in_k = rk < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptr + b_off, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if not SCALED:
            acc = dot(a, b, acc, UPCAST)
            if SWIGLU:
                acc2 = dot(a, tl.load(b2_ptr + b_off, mask=in_k[:, None] & in_n[None, :], other=0.0), acc2, UPCAST)
        else:
            if QUANT_A:
                qa, sa = quantize_tile(a.to(tl.float32), FP8_MAX, EMIN, UE8M0)  # as act_quant
                a = qa.to(b_ptr.dtype.element_ty)
            else:
                sa = tl.load(as_ptrs + kb, mask=in_m, other=0.0)
            sb = tl.load(bs_ptr + bs_off + kb, mask=in_n, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
            if SWIGLU:
                b2 = tl.load(b2_ptr + b_off, mask=in_k[:, None] & in_n[None, :], other=0.0)
                sb2 = tl.load(b2s_ptr + bs_off + kb, mask=in_n, other=0.0)
                acc2 += tl.dot(a, b2) * sa[:, None] * sb2[None, :]
        a_ptrs += BLOCK_K
        b_off += BLOCK_K
    out = in_m[:, None] & in_n[None, :]
    if SPLIT_K > 1:
        last, acc, acc2 = split_k_gather(acc, acc2, ws_ptr, count_ptr, pid, split, tiles_m * tiles_n, SPLIT_K, SWIGLU,
                                         BLOCK_M, BLOCK_N)
        out &= last
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc2
    c_off = rm[:, None].to(tl.int64) * N + rn[None, :]
    if RESIDUAL:
        acc += tl.load(r_ptr + c_off, mask=out, other=0.0).to(tl.float32)
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=out)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, target: str = "nvidia", config: GemmConfig | None = None
             ) -> torch.Tensor:
    """a [M, K] fp8, a_scale [M, ceil(K/128)], b [N, K] fp8 (same format), b_scale [ceil(N/128), ceil(K/128)] -> [M, N].

    `config` overrides the launch table (benchmarks/gpu_kernels.py --tune sweeps it)."""
    check_target(target)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm: a {list(a.shape)} and b {list(b.shape)} must be [M, K] and [N, K]")
    if a.dtype != b.dtype or a.element_size() != 1:
        raise ValueError(f"fp8_gemm: a is {a.dtype}, b is {b.dtype}; both must be the same FP8 format")
    (m, k), n = a.shape, b.shape[0]
    n_kb = triton.cdiv(k, BLOCK_K)
    if tuple(a_scale.shape) != (m, n_kb) or tuple(b_scale.shape) != (triton.cdiv(n, 128), n_kb):
        raise ValueError(f"fp8_gemm: scales {list(a_scale.shape)}, {list(b_scale.shape)} do not fit a {list(a.shape)}, "
                         f"b {list(b.shape)}; expected [{m}, {n_kb}] and [{triton.cdiv(n, 128)}, {n_kb}]")
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError("fp8_gemm: scales must be float32")
    a, b, a_scale, b_scale = (t.contiguous() for t in (a, b, a_scale, b_scale))
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    cfg = config or gemm_config(m, target, n, k, a.device)
    grid, extra = _grid(cfg, m, n, n_kb, target, a.device, swiglu=False)
    _fp8_gemm_kernel[grid](a, a_scale, b, b_scale, c, m, n, k, n_kb, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=BLOCK_K, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           **extra, enable_fp_fusion=FP_FUSION)
    return c


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device) -> torch.Tensor:
    """The per-tile arrival counters of split-K launches on `device`: zeros, and every launch leaves them
    zero. Made once per device (the backend makes it at load, so never inside a graph capture)."""
    device = torch.device(device)
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def split_k_args(cfg: GemmConfig, tiles: int, n_kb: int, target: str, device: torch.device, swiglu: bool
                 ) -> tuple[int, dict]:
    """(splits, kernel kwargs) of a launch of `tiles` output tiles: the fp32 partials' workspace (two planes
    per split with SwiGLU) and the counters, where the config and the tile count call for split-K."""
    splits, per = split_k(cfg, tiles, n_kb, target, device)
    if splits == 1:
        return 1, {}
    ws = torch.empty((2 if swiglu else 1) * splits * tiles * cfg.block_m * cfg.block_n, dtype=torch.float32,
                     device=device)
    return splits, dict(ws_ptr=ws, count_ptr=split_counters(device), kb_per_split=per, SPLIT_K=splits)


def _grid(cfg: GemmConfig, m: int, n: int, n_kb: int, target: str, device: torch.device, swiglu: bool):
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    splits, extra = split_k_args(cfg, tiles, n_kb, target, device, swiglu)
    return (tiles, splits), extra


def _check_fp8_weight(what: str, x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, fp8_max: float) -> None:
    if x.dim() != 2 or b.dim() != 2 or x.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: x {list(x.shape)} and b {list(b.shape)} must be [M, K] and [N, K]")
    if b.dtype not in FP8_EMIN or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{what}: x {x.dtype}, b {b.dtype}; expected a float activation and an e4m3 weight")
    if not 0 < fp8_max <= FP8_MAX[b.dtype]:
        raise ValueError(f"{what}: fp8_max={fp8_max} is outside (0, the max of {b.dtype}]")
    n, n_kb = b.shape[0], triton.cdiv(b.shape[1], BLOCK_K)
    if tuple(b_scale.shape) != (triton.cdiv(n, 128), n_kb) or b_scale.dtype != torch.float32:
        raise ValueError(f"{what}: b_scale {b_scale.dtype} {list(b_scale.shape)}; expected float32 "
                         f"[{triton.cdiv(n, 128)}, {n_kb}]")


def _quant_a_launch(x, b, b_scale, fp8_max, ue8m0, out_dtype, target, config=None, **extra) -> torch.Tensor:
    (m, k), n = x.shape, b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return c
    cfg = config or fit_registers(gemm_config(m, target, n, k, x.device, a_elt=x.element_size()),  # x's tiles
                                  accumulators=2 if "b2_ptr" in extra else 1, quant_a=True)
    grid, split = _grid(cfg, m, n, triton.cdiv(k, BLOCK_K), target, x.device, swiglu="b2_ptr" in extra)
    extra.update(split)
    _fp8_gemm_kernel[grid](x, b_scale, b, b_scale, c, m, n, k, triton.cdiv(k, BLOCK_K), BLOCK_M=cfg.block_m,
                           BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, GROUP_M=cfg.group_m, QUANT_A=True,
                           FP8_MAX=float(fp8_max), EMIN=FP8_EMIN[b.dtype], UE8M0=ue8m0, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages, **extra, enable_fp_fusion=FP_FUSION)
    return c


def fp8_linear(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, fp8_max: float, ue8m0: bool = False,
               out_dtype: torch.dtype | None = None, target: str = "nvidia",
               residual: torch.Tensor | None = None, config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16/fp32 -> act_quant(x) · (b · b_scale)ᵀ [M, N] (+ residual [M, N]), the activation
    quantized inside the GEMM (same scales and rounding as act_quant; meant for M <= launch.FUSED_QUANT_ROWS)
    and the residual added before the one rounding to the output dtype."""
    check_target(target)
    _check_fp8_weight("fp8_linear", x, b, b_scale, fp8_max)
    extra = {}
    if residual is not None:
        if tuple(residual.shape) != (x.shape[0], b.shape[0]):
            raise ValueError(f"fp8_linear: residual {list(residual.shape)}; expected [{x.shape[0]}, {b.shape[0]}]")
        extra = dict(r_ptr=residual.contiguous(), RESIDUAL=True)
    return _quant_a_launch(x.contiguous(), b.contiguous(), b_scale.contiguous(), fp8_max, ue8m0, out_dtype, target,
                           config, **extra)


def fp8_swiglu(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor,
               fp8_max: float, ue8m0: bool = False, target: str = "nvidia", config: GemmConfig | None = None
               ) -> torch.Tensor:
    """silu(x·w1ᵀ) · (x·w3ᵀ) [M, I] in x's dtype: an MLP's gate and up projections in one launch, the
    activation quantized inside (as fp8_linear) and read once for both weights."""
    check_target(target)
    _check_fp8_weight("fp8_swiglu", x, w1, s1, fp8_max)
    _check_fp8_weight("fp8_swiglu", x, w3, s3, fp8_max)
    if w1.shape != w3.shape or w1.dtype != w3.dtype:
        raise ValueError(f"fp8_swiglu: w1 {w1.dtype} {list(w1.shape)} and w3 {w3.dtype} {list(w3.shape)} must match")
    return _quant_a_launch(x.contiguous(), w1.contiguous(), s1.contiguous(), fp8_max, ue8m0, None, target, config,
                           b2_ptr=w3.contiguous(), b2s_ptr=s3.contiguous(), SWIGLU=True)


def _check_16bit_weight(what: str, x: torch.Tensor, b: torch.Tensor) -> None:
    if x.dim() != 2 or b.dim() != 2 or x.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: x {list(x.shape)} and b {list(b.shape)} must be [M, K] and [N, K]")
    if b.dtype not in (torch.bfloat16, torch.float16) or x.dtype != b.dtype:
        raise ValueError(f"{what}: x {x.dtype}, b {b.dtype}; expected both bfloat16 or both float16 (FP8 weights: "
                         "fp8_linear)")


def _16bit_launch(x, b, target, config=None, **extra) -> torch.Tensor:
    (m, k), n = x.shape, b.shape[0]
    c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return c
    # the 16-bit activation tile takes the registers the in-GEMM quantization's does (without counting it, 7 launches
    # at M = 64 spilled on sm80: benchmarks/gpu_compile.py)
    cfg = config or fit_registers(gemm_config(m, target, n, k, x.device, a_elt=2, elt=2),
                                  accumulators=2 if "b2_ptr" in extra else 1, quant_a=True)
    grid, split = _grid(cfg, m, n, triton.cdiv(k, BLOCK_K), target, x.device, swiglu="b2_ptr" in extra)
    extra.update(split)
    _fp8_gemm_kernel[grid](x, b, b, b, c, m, n, k, triton.cdiv(k, BLOCK_K), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=BLOCK_K, GROUP_M=cfg.group_m, SCALED=False, UPCAST=interpreted(x.device),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra, enable_fp_fusion=FP_FUSION)
    return c


def bf16_linear(x: torch.Tensor, b: torch.Tensor, target: str = "nvidia", residual: torch.Tensor | None = None,
                config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] · bᵀ [M, N] (+ residual [M, N]) for a bf16 (or fp16) weight b [N, K] in x's dtype: fp32 sums, the
    residual added before the one rounding. The BF16 mode's decode-sized linear_add in one launch (meant for
    M <= launch.FUSED_QUANT_ROWS; a plain linear stays on the vendor's GEMM)."""
    check_target(target)
    _check_16bit_weight("bf16_linear", x, b)
    extra = {}
    if residual is not None:
        if tuple(residual.shape) != (x.shape[0], b.shape[0]) or residual.dtype != x.dtype:
            raise ValueError(f"bf16_linear: residual {residual.dtype} {list(residual.shape)}; expected {x.dtype} "
                             f"[{x.shape[0]}, {b.shape[0]}]")
        extra = dict(r_ptr=residual.contiguous(), RESIDUAL=True)
    return _16bit_launch(x.contiguous(), b.contiguous(), target, config, **extra)


def bf16_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, target: str = "nvidia",
                config: GemmConfig | None = None) -> torch.Tensor:
    """silu(x·w1ᵀ) · (x·w3ᵀ) [M, I] in x's dtype for bf16 (or fp16) weights: an MLP's gate and up projections in one
    launch that reads x once (fp8_swiglu's, without scales)."""
    check_target(target)
    _check_16bit_weight("bf16_swiglu", x, w1)
    _check_16bit_weight("bf16_swiglu", x, w3)
    if w1.shape != w3.shape:
        raise ValueError(f"bf16_swiglu: w1 {list(w1.shape)} and w3 {list(w3.shape)} must match")
    return _16bit_launch(x.contiguous(), w1.contiguous(), target, config, b2_ptr=w3.contiguous(), SWIGLU=True)


@torch.library.custom_op("dsv3::bf16_linear", mutates_args=())
def bf16_linear_op(x: torch.Tensor, b: torch.Tensor, target: str, residual: torch.Tensor | None = None
                   ) -> torch.Tensor:
    return bf16_linear(x, b, target, residual)


@bf16_linear_op.register_fake
def _(x, b, target, residual=None):
    return x.new_empty(x.shape[0], b.shape[0])


@torch.library.custom_op("dsv3::bf16_swiglu", mutates_args=())
def bf16_swiglu_op(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, target: str) -> torch.Tensor:
    return bf16_swiglu(x, w1, w3, target)


@bf16_swiglu_op.register_fake
def _(x, w1, w3, target):
    return x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("dsv3::fp8_linear", mutates_args=())
def fp8_linear_op(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, fp8_max: float, ue8m0: bool,
                  target: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    return fp8_linear(x, b, b_scale, fp8_max, ue8m0, x.dtype, target, residual)


@fp8_linear_op.register_fake
def _(x, b, b_scale, fp8_max, ue8m0, target, residual=None):
    return x.new_empty(x.shape[0], b.shape[0])


@torch.library.custom_op("dsv3::fp8_swiglu", mutates_args=())
def fp8_swiglu_op(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor,
                  fp8_max: float, ue8m0: bool, target: str) -> torch.Tensor:
    return fp8_swiglu(x, w1, s1, w3, s3, fp8_max, ue8m0, target)


@fp8_swiglu_op.register_fake
def _(x, w1, s1, w3, s3, fp8_max, ue8m0, target):
    return x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("dsv3::fp8_gemm", mutates_args=())
def fp8_gemm_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                out_dtype: torch.dtype, target: str) -> torch.Tensor:
    return fp8_gemm(a, a_scale, b, b_scale, out_dtype, target)


@fp8_gemm_op.register_fake
def _(a, a_scale, b, b_scale, out_dtype, target):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)
