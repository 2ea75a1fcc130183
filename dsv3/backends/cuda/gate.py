"""The MoE gate's selection in one launch per batch: scores, bias, group scores, group mask, top-k,
normalization and route scale (the reference is ~15 ops of topk/sort/gather). The gate's linear
stays a GEMM before it (all SMs for a batch of one); a program per launch.rows_per_program tokens here
(one on a GPU).

Reference: dsv3.backends.reference.ReferenceKernels.moe_gate. Top-k by repeated argmax: k <= 8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FP_FUSION, rows_per_program


@triton.jit
def _gate_select_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, EG, N_GROUP, route_scale,
                        TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr, GROUP: tl.constexpr,
                        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr,
                        BLOCK_K: tl.constexpr, ROWS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [R] tokens
    g = tl.arange(0, BLOCK_G)[None, :, None]
    j = tl.arange(0, BLOCK_EG)[None, None, :]
    e = g * EG + j  # [1, G, EG]: expert ids laid out by group
    valid = (g < N_GROUP) & (j < EG)
    src = tl.minimum(t, T - 1)[:, None, None]  # rows past T redo the last token (their stores are masked)
    s = tl.load(logits_ptr + src * E + e, mask=valid, other=float("-inf")).to(tl.float32)  # [R, G, EG]
    if SIGMOID:
        scores = tl.sigmoid(s)
    else:
        ex = tl.exp(s - tl.max(tl.max(s, 2), 1)[:, None, None])
        scores = ex / tl.sum(tl.sum(tl.where(valid, ex, 0.0), 2), 1)[:, None, None]
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e, mask=valid, other=0.0)
    choice = tl.where(valid, choice, float("-inf"))
    if GROUP != 0:  # 1: a group scores its max; 2: the sum of its top two
        m1 = tl.max(choice, 2)  # [R, G]
        gs = m1
        if GROUP == 2:
            first = tl.argmax(choice, 2)
            m2 = tl.max(tl.where(j == first[:, :, None], float("-inf"), choice), 2)
            gs = m1 + m2
        gi = tl.arange(0, BLOCK_G)[None, :]  # [1, G]
        gs = tl.where(gi < N_GROUP, gs, float("-inf"))
        keep = tl.zeros((ROWS, BLOCK_G), tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(gs, 1)[:, None]
            keep = keep | (gi == best)
            gs = tl.where(gi == best, float("-inf"), gs)
        choice = tl.where(keep[:, :, None], choice, float("-inf"))  # -inf, not 0: biases may be negative
    flat_choice = tl.reshape(choice, (ROWS, BLOCK_G * BLOCK_EG))
    flat_scores = tl.reshape(tl.where(valid, scores, 0.0), (ROWS, BLOCK_G * BLOCK_EG))
    flat_e = tl.reshape(e, (1, BLOCK_G * BLOCK_EG))
    kk = tl.arange(0, BLOCK_K)[None, :]  # [1, K]
    weights = tl.zeros((ROWS, BLOCK_K), tl.float32)
    ids = tl.zeros((ROWS, BLOCK_K), tl.int64)
    for i in tl.static_range(TOP_K):
        best = tl.argmax(flat_choice, 1)[:, None]
        hit = tl.arange(0, BLOCK_G * BLOCK_EG)[None, :] == best  # [R, G·EG]
        weights = tl.where(kk == i, tl.sum(tl.where(hit, flat_scores, 0.0), 1)[:, None], weights)
        ids = tl.where(kk == i, tl.sum(tl.where(hit, flat_e, 0), 1)[:, None].to(tl.int64), ids)
        flat_choice = tl.where(hit, float("-inf"), flat_choice)
    if NORM:
        weights = weights / (tl.sum(weights, 1)[:, None] + 1e-20)
    out = (t[:, None] < T) & (kk < TOP_K)
    tl.store(w_ptr + t[:, None] * TOP_K + kk, weights * route_scale, mask=out)
    tl.store(ids_ptr + t[:, None] * TOP_K + kk, ids, mask=out)


GROUP_SCORES = {"none": 0, "max": 1, "top2_sum": 2}


def gate_select(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
                scoring_func: str, group_score: str, norm_topk_prob: bool, route_scale: float,
                rows_per_prog: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 (x · gateᵀ) -> (weights [T, k] fp32, ids [T, k] int64), as ReferenceKernels.moe_gate.
    `rows_per_prog` overrides the device's tokens per program (launch.rows_per_program)."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"gate_select: logits {logits.dtype} {list(logits.shape)}; expected fp32 [T, E]")
    T, E = logits.shape
    grouped = n_group > 1 and group_score != "none"
    groups = n_group if grouped else 1
    if E % groups or not 1 <= top_k <= 8 or (grouped and not 1 <= topk_group <= n_group):
        raise ValueError(f"gate_select: E={E}, n_group={n_group}, topk_group={topk_group}, top_k={top_k}; need "
                         "E divisible by n_group, 1 <= topk_group <= n_group and 1 <= top_k <= 8")
    if scoring_func not in ("sigmoid", "softmax") or group_score not in GROUP_SCORES:
        raise ValueError(f"gate_select: scoring_func={scoring_func!r}, group_score={group_score!r}")
    if grouped and group_score == "top2_sum" and E // groups < 2:
        raise ValueError(f"gate_select: top2_sum needs 2+ experts per group, E={E} over {n_group} groups")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        logits = logits.contiguous()
        b = bias.float().contiguous() if bias is not None else logits
        per = rows_per_program(logits.device, rows_per_prog)
        grid = (triton.cdiv(T, per),)
        _gate_select_kernel[grid](logits, b, weights, ids, T, E, E // groups, groups, float(route_scale),
                                  TOPK_GROUP=topk_group if grouped else 1, TOP_K=top_k,
                                  SIGMOID=scoring_func == "sigmoid", GROUP=GROUP_SCORES[group_score] if grouped else 0,
                                  HAS_BIAS=bias is not None, NORM=norm_topk_prob and top_k > 1,
                                  BLOCK_G=triton.next_power_of_2(groups), BLOCK_EG=triton.next_power_of_2(E // groups),
                                  BLOCK_K=triton.next_power_of_2(top_k), ROWS=per, enable_fp_fusion=FP_FUSION)
    return weights, ids


@torch.library.custom_op("dsv3::gate_select", mutates_args=())
def gate_select_op(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
                   scoring_func: str, group_score: str, norm_topk_prob: bool, route_scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return gate_select(logits, bias, top_k, n_group, topk_group, scoring_func, group_score, norm_topk_prob, route_scale)


@gate_select_op.register_fake
def _(logits, bias, top_k, n_group, topk_group, scoring_func, group_score, norm_topk_prob, route_scale):
    T = logits.shape[0]
    return logits.new_empty(T, top_k), logits.new_empty(T, top_k, dtype=torch.int64)
