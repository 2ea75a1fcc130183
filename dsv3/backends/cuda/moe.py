"""Fused MoE over FP8 (or bf16) experts: tokens sorted by expert, one grouped GEMM launch per projection.

1. routing (torch, no host sync): the T·k (token, slot) rows are sorted by local expert and laid
   out in tiles of BLOCK_M rows that each belong to one expert (padded with a sentinel row);
2. gate/up: one launch computes x·w1ᵀ and x·w3ᵀ for every tile and writes silu(g)·u;
3. act_quant of that intermediate, then down: one launch, rows scaled by their routing weight
   (at decode sizes both GEMMs quantize their activation tiles themselves: no act_quant launches);
4. the k rows of each token are summed (one launch), skipping rows routed to another rank's experts.

bf16/fp16 experts (a GPU without FP8, or a BF16 checkpoint) take the same launches with the activations as
they are (no scales, no act_quant): the MoE then stays free of host syncs, so the decode step can be a graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.fp8 import FP8_EMIN
from .act_quant import act_quant
from .fp8_gemm import split_k_args
from .jit import dot, quantize_tile, split_k_gather
from .launch import (
    FP_FUSION,
    FUSED_QUANT_ROWS,
    GemmConfig,
    check_target,
    fit_registers,
    interpreted,
    moe_config,
    rows_per_program,
)

BLOCK_K = 128


@triton.jit
def _moe_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, b2_ptr, b2s_ptr, c_ptr, rows_ptr, tile_expert_ptr, rw_ptr,
                     N, K, n_rows, n_kb, n_nb, A_DIV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SWIGLU: tl.constexpr, WEIGHTED: tl.constexpr, QUANT_A: tl.constexpr = False,
                     FP8_MAX: tl.constexpr = 1.0, EMIN: tl.constexpr = 0, UE8M0: tl.constexpr = False,
                     ws_ptr=None, count_ptr=None, kb_per_split=0, SPLIT_K: tl.constexpr = 1,
                     W_FP8: tl.constexpr = True, UPCAST: tl.constexpr = False):
    """QUANT_A: a_ptr holds the bf16/fp32 activation and each K step quantizes its tile as act_quant would
    (as in fp8_gemm.py): the decode-sized MoE needs no act_quant launches. SPLIT_K > 1: the K blocks of a
    tile over several programs (axis 2), as in fp8_gemm.py, so that a few tokens' experts fill the GPU.
    W_FP8 False: bf16/fp16 weights and activations of the same dtype, multiplied as they are (no scales read;
    UPCAST under the interpreter, see jit.dot)."""
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    if e < 0:  # the grid is sized for the worst case without reading the counts back
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < n_rows
    a_rows = (rows // A_DIV).to(tl.int64)  # gate/up reads token t for rows t·k .. t·k + k - 1
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kb_lo = split * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, n_kb) if SPLIT_K > 1 else n_kb
    rk = tl.arange(0, BLOCK_K)
    in_n = rn < N
    a_ptrs = a_ptr + a_rows[:, None] * K + kb_lo * BLOCK_K + rk[None, :]
    as_ptrs = as_ptr + a_rows * n_kb
    b_off = e * N * K + rn[None, :].to(tl.int64) * K + kb_lo * BLOCK_K + rk[:, None]
    bs_off = (e * n_nb + rn // 128) * n_kb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        in_k = rk < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_ptr + b_off, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if W_FP8:
            if QUANT_A:
                qa, qs = quantize_tile(a.to(tl.float32), FP8_MAX, EMIN, UE8M0)
                a = qa.to(b_ptr.dtype.element_ty)
                sa = qs[:, None]
            else:
                sa = tl.load(as_ptrs + kb, mask=valid, other=0.0)[:, None]
            sb = tl.load(bs_ptr + bs_off + kb, mask=in_n, other=0.0)[None, :]
            acc += tl.dot(a, b) * sa * sb
        else:
            acc = dot(a, b, acc, UPCAST)
        if SWIGLU:
            b2 = tl.load(b2_ptr + b_off, mask=in_k[:, None] & in_n[None, :], other=0.0)
            if W_FP8:
                sb2 = tl.load(b2s_ptr + bs_off + kb, mask=in_n, other=0.0)[None, :]
                acc2 += tl.dot(a, b2) * sa * sb2
            else:
                acc2 = dot(a, b2, acc2, UPCAST)
        a_ptrs += BLOCK_K
        b_off += BLOCK_K
    out = valid[:, None] & in_n[None, :]
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(1) + pid_n
        last, acc, acc2 = split_k_gather(acc, acc2, ws_ptr, count_ptr, tile, split,
                                         tl.num_programs(0) * tl.num_programs(1), SPLIT_K, SWIGLU, BLOCK_M, BLOCK_N)
        out &= last
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc2
    if WEIGHTED:
        acc = acc * tl.load(rw_ptr + rows, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out)


@triton.jit
def _route_keys(ids_ptr, r, n_rows, first, E):
    """The local expert of rows r (E: another rank's expert, or past the end)."""
    local = tl.load(ids_ptr + r, mask=r < n_rows, other=-1).to(tl.int32) - first
    return tl.where((local >= 0) & (local < E) & (r < n_rows), local, E)


@triton.jit
def _route_kernel(ids_ptr, rows_ptr, tile_expert_ptr, n_rows, first, E, max_tiles, BLOCK_M: tl.constexpr,
                  BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_F: tl.constexpr):
    """route() in one program, for decode-sized batches: rows compared with every expert and with every earlier
    row instead of a sort and a dozen small launches. CHUNK rows (tiles) at a time, so the [rows, experts] and
    [rows, rows] comparisons stay [CHUNK, BLOCK_E] and [CHUNK, CHUNK] in registers: a batch-32 step of V3 routes
    256 rows over 257 experts, whose whole [256, 512] comparison spilled 16 KB a thread to local memory on sm90."""
    c = tl.arange(0, CHUNK)
    ee = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), tl.int32)
    for r0 in range(0, n_rows, CHUNK):
        key = _route_keys(ids_ptr, r0 + c, n_rows, first, E)
        counts += tl.sum((key[:, None] == ee[None, :]).to(tl.int32), 0)
    counts = tl.where(ee < E, counts, 0)
    tiles_per = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles_per, 0)
    tile_start = tile_end - tiles_per
    for off in range(0, max_tiles * BLOCK_M, BLOCK_F):  # every slot starts as the sentinel n_rows
        f = off + tl.arange(0, BLOCK_F)
        tl.store(rows_ptr + f, tl.full((BLOCK_F,), 0, tl.int32) + n_rows, mask=f < max_tiles * BLOCK_M)
    tl.debug_barrier()
    for r0 in range(0, n_rows, CHUNK):
        r = r0 + c
        key = _route_keys(ids_ptr, r, n_rows, first, E)
        rank = tl.zeros((CHUNK,), tl.int32)  # earlier rows of the same expert: a stable order
        for j0 in range(0, r0 + CHUNK, CHUNK):
            j = j0 + c
            kj = _route_keys(ids_ptr, j, n_rows, first, E)
            rank += tl.sum(((kj[None, :] == key[:, None]) & (j[None, :] < r[:, None])).to(tl.int32), 1)
        start = tl.sum(tl.where(key[:, None] == ee[None, :], tile_start[None, :], 0), 1)
        tl.store(rows_ptr + start * BLOCK_M + rank, r, mask=key < E)
    for t0 in range(0, max_tiles, CHUNK):
        t = t0 + c
        te = tl.sum(((tile_end[None, :] <= t[:, None]) & (ee[None, :] < E)).to(tl.int32), 1)  # searchsorted, right
        tl.store(tile_expert_ptr + t, tl.where(te < E, te, -1), mask=t < max_tiles)


#: route() takes the one-program kernel up to this many (token, slot) rows: decode and small batches
ROUTE_KERNEL_ROWS = 512


def route(ids: torch.Tensor, first: int, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [tiles·block_m] int32, tile_expert [tiles] int32) for ids [T, k] of global expert ids.

    rows lists the flattened (token, slot) indices of each local expert's rows, each expert's run
    padded to a multiple of block_m with the sentinel T·k; tile_expert is the local expert of each
    tile, -1 for tiles past the end. Sized without a device-to-host copy.
    """
    n_rows = ids.numel()
    max_tiles = min(n_rows, triton.cdiv(n_rows + n_experts * (block_m - 1), block_m))
    if n_rows <= ROUTE_KERNEL_ROWS and n_experts < 1024:
        rows = torch.empty(max_tiles * block_m, dtype=torch.int32, device=ids.device)
        tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=ids.device)
        block_e = max(16, triton.next_power_of_2(n_experts + 1))
        chunk = max(8, min(64, 4096 // block_e, triton.next_power_of_2(n_rows)))  # <= 4096 comparisons at once
        _route_kernel[(1,)](ids.contiguous(), rows, tile_expert, n_rows, first, n_experts, max_tiles, BLOCK_M=block_m,
                            BLOCK_E=block_e, CHUNK=chunk, BLOCK_F=256, enable_fp_fusion=FP_FUSION)
        return rows, tile_expert
    return route_torch(ids, first, n_experts, block_m)


def route_torch(ids: torch.Tensor, first: int, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """route() in torch ops: any size (prefill)."""
    n_rows = ids.numel()
    local = ids.flatten() - first
    key = torch.where((local >= 0) & (local < n_experts), local, n_experts)  # n_experts = not here
    order = torch.argsort(key, stable=True)
    # counted with index_add, not bincount: bincount sizes its output from the max id, a device-to-host copy
    # that would also make the decode step uncapturable as a graph
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=ids.device).index_add_(
        0, key, torch.ones_like(key))[:n_experts]
    tiles_per = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per, 0)
    max_tiles = min(n_rows, triton.cdiv(n_rows + n_experts * (block_m - 1), block_m))
    sorted_key = key[order]
    here = sorted_key < n_experts
    safe_key = sorted_key.clamp(max=n_experts - 1)
    run_start = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    dest = (tile_end - tiles_per)[safe_key] * block_m + torch.arange(n_rows, device=ids.device) - run_start[safe_key]
    dest = torch.where(here, dest, max_tiles * block_m)  # rows of other ranks go to a dump slot
    rows = torch.full((max_tiles * block_m + 1,), n_rows, dtype=torch.int32, device=ids.device)
    rows.scatter_(0, dest, order.to(torch.int32))
    tile_expert = torch.searchsorted(tile_end, torch.arange(max_tiles, device=ids.device), right=True)
    tile_expert = torch.where(tile_expert < n_experts, tile_expert, -1).to(torch.int32)
    return rows[:-1], tile_expert


def fused_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              w1: torch.Tensor, s1: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None,
              w2: torch.Tensor, s2: torch.Tensor | None, first: int, fp8_max: float, target: str = "nvidia",
              ue8m0: bool = False, config: GemmConfig | None = None, rows_per_prog: int | None = None
              ) -> torch.Tensor:
    """Σ_k weights[t, k] · expert_{ids[t, k]}(x[t]) over the experts held here (global ids first .. first + E - 1).
    `ue8m0`: activation scales rounded up to powers of two (V3.1), for both quantized activations.
    `rows_per_prog`: the combine's tokens per program (launch.rows_per_program; the tests set it).

    x [T, D] bf16/fp32; w1/w3 [E, I, D] and w2 [E, D, I] FP8 with block scales [E, ceil(·/128), ceil(·/128)],
    or (scales None) bf16/fp16 weights of x's dtype: fp32 accumulation, SwiGLU in fp32, h rounded once.
    """
    check_target(target)
    e, inter, dim = w1.shape
    if x.dim() != 2 or x.shape[1] != dim or w3.shape != w1.shape or tuple(w2.shape) != (e, dim, inter):
        raise ValueError(f"fused_moe: x {list(x.shape)}, w1 {list(w1.shape)}, w3 {list(w3.shape)}, w2 {list(w2.shape)} "
                         f"do not fit [T, D], [E, I, D], [E, I, D], [E, D, I]")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe: ids {list(ids.shape)} and weights {list(weights.shape)} must both be [T={x.shape[0]}, k]")
    w_fp8 = s1 is not None
    for w, s in ((w1, s1), (w3, s3), (w2, s2)):
        if not w_fp8:
            if s is not None or w.dtype != x.dtype or x.dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"fused_moe: unscaled weight {w.dtype} for x {x.dtype}; expected bf16 or fp16 "
                                 "weights of x's dtype, or FP8 weights with scales for all three")
            continue
        want = (e, triton.cdiv(w.shape[1], 128), triton.cdiv(w.shape[2], 128))
        if s is None or tuple(s.shape) != want or w.dtype != w1.dtype or w.element_size() != 1:
            raise ValueError(f"fused_moe: weight {w.dtype} {list(w.shape)} with scale "
                             f"{None if s is None else list(s.shape)}; expected FP8 {w1.dtype} and scale {list(want)}")
    t, k = ids.shape
    if t == 0:
        return torch.zeros_like(x)
    fp8 = w1.dtype
    n_rows = t * k
    fused = n_rows <= FUSED_QUANT_ROWS or not w_fp8  # the GEMMs read x (and h) as they are, not as FP8
    cfg = config or moe_config(t * k / e, target, inter, dim, x.device, elt=w1.element_size(),
                               a_elt=x.element_size() if fused else 1)
    rows, tile_expert = route(ids, first, e, cfg.block_m)
    launch = dict(BLOCK_K=BLOCK_K, num_stages=cfg.num_stages)
    # gate/up hold two accumulators, down one; both keep block_m (the routing's tiles), warps and width may differ
    up = cfg if config else fit_registers(cfg, accumulators=2, quant_a=fused and w_fp8)
    down = cfg if config else fit_registers(cfg, accumulators=1, quant_a=fused and w_fp8)
    # decode-sized: each GEMM quantizes its own activation tiles (no act_quant launches); larger: quantize once
    if not w_fp8:  # bf16/fp16 weights: activations as they are; scale slots below are unread
        launch.update(W_FP8=False, UPCAST=interpreted(x.device))
        s1 = s3 = s2 = w1
    elif fused:
        launch.update(QUANT_A=True, FP8_MAX=float(fp8_max), EMIN=FP8_EMIN[fp8], UE8M0=ue8m0)

    def quantized(a):  # (A, its scales) as the GEMM reads them; with QUANT_A (or bf16 weights) the slot is unread
        return (a, a) if fused else act_quant(a, fp8, fp8_max, ue8m0)

    # rows of other ranks (and of no tile) are never written nor read below: no zero fill
    h = torch.empty(n_rows, inter, dtype=x.dtype, device=x.device)
    grid, split = _grid(up, tile_expert.numel(), inter, dim, target, x.device, swiglu=True)
    # rw_ptr (routing weights) is unread without WEIGHTED: any tensor fills the slot
    _moe_gemm_kernel[grid](*quantized(x.contiguous()), w1, s1, w3, s3, h, rows, tile_expert, rows, inter, dim, n_rows,
                           triton.cdiv(dim, BLOCK_K), triton.cdiv(inter, 128), A_DIV=k, SWIGLU=True, WEIGHTED=False,
                           BLOCK_M=up.block_m, BLOCK_N=up.block_n, num_warps=up.num_warps, **launch, **split,
                           enable_fp_fusion=FP_FUSION)
    y = torch.empty(n_rows, dim, dtype=torch.float32, device=x.device)  # rows of other ranks: skipped by the sum
    grid, split = _grid(down, tile_expert.numel(), dim, inter, target, x.device, swiglu=False)
    _moe_gemm_kernel[grid](*quantized(h), w2, s2, w2, s2, y, rows, tile_expert, weights.float().contiguous(), dim, inter,
                           n_rows, triton.cdiv(inter, BLOCK_K), triton.cdiv(dim, 128), A_DIV=1, SWIGLU=False,
                           WEIGHTED=True, BLOCK_M=down.block_m, BLOCK_N=down.block_n, num_warps=down.num_warps,
                           **launch, **split, enable_fp_fusion=FP_FUSION)
    out = torch.empty(t, dim, dtype=x.dtype, device=x.device)
    per = rows_per_program(x.device, rows_per_prog)
    block_d = min(max(16, 1024 // per), triton.next_power_of_2(dim))  # [per, k, block_d] stays a modest tile
    _combine_kernel[(triton.cdiv(t, per), triton.cdiv(dim, block_d))](y, ids, out, first, e, t, dim, K_SLOTS=k,
                                                                     BLOCK_K=triton.next_power_of_2(k),
                                                                     BLOCK_D=block_d, ROWS=per,
                                                                     enable_fp_fusion=FP_FUSION)
    return out


def _grid(cfg: GemmConfig, m_tiles: int, n: int, k: int, target: str, device: torch.device, swiglu: bool):
    """(grid, kernel kwargs) of one grouped GEMM: tiles of rows x tiles of N x splits of K. The tile count is
    the worst case the grid is sized for (tiles past the routed rows exit at once), so split-K is chosen
    for the rows a decode step can route, read back from nothing."""
    n_tiles = triton.cdiv(n, cfg.block_n)
    splits, extra = split_k_args(cfg, m_tiles * n_tiles, triton.cdiv(k, BLOCK_K), target, device, swiglu)
    return (m_tiles, n_tiles, splits), extra


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, first, E, T, D, K_SLOTS: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """out[t] = Σ_j y[t·k + j] over the slots j whose expert is held here, in fp32, one rounding: the sum of the
    k weighted expert outputs of a token (rows routed to other ranks were never written and are not read)."""
    t = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]  # [R, 1] tokens
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]  # [1, BLOCK_D]
    j = tl.arange(0, BLOCK_K)[None, :]  # [1, K] slots
    slot = (j < K_SLOTS) & (t < T)
    local = tl.load(ids_ptr + t * K_SLOTS + j, mask=slot, other=-1) - first
    here = slot & (local >= 0) & (local < E)  # [R, K]
    y = tl.load(y_ptr + (t * K_SLOTS + j)[:, :, None] * D + d[:, None, :], mask=here[:, :, None] & (d[:, None, :] < D),
                other=0.0)  # [R, K, BLOCK_D]
    tl.store(out_ptr + t * D + d, tl.sum(y, 1).to(out_ptr.dtype.element_ty), mask=(t < T) & (d < D))


@torch.library.custom_op("dsv3::fused_moe", mutates_args=())
def fused_moe_op(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor,
                 s1: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None, w2: torch.Tensor,
                 s2: torch.Tensor | None, first: int, fp8_max: float, target: str,
                 ue8m0: bool = False) -> torch.Tensor:
    return fused_moe(x, weights, ids, w1, s1, w3, s3, w2, s2, first, fp8_max, target, ue8m0)  # the table's config


@fused_moe_op.register_fake
def _(x, weights, ids, w1, s1, w3, s3, w2, s2, first, fp8_max, target, ue8m0=False):
    return x.new_empty(x.shape)
