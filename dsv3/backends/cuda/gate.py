"""The MoE gate's selection in one launch per batch: scores, bias, group scores, group mask, top-k,
normalization and route scale (the reference is ~15 ops of topk/sort/gather). The gate's linear
stays a GEMM before it (all SMs for a batch of one); one program per token here.

Reference: dsv3.backends.reference.ReferenceKernels.moe_gate. Top-k by repeated argmax: k <= 8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FP_FUSION


@triton.jit
def _gate_select_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, E, EG, N_GROUP, route_scale,
                        TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr, GROUP: tl.constexpr,
                        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_EG: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_EG)[None, :]
    e = g * EG + j  # [G, EG]: expert ids laid out by group
    valid = (g < N_GROUP) & (j < EG)
    s = tl.load(logits_ptr + t * E + e, mask=valid, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(s)
    else:
        ex = tl.exp(s - tl.max(tl.max(s, 1), 0))
        scores = ex / tl.sum(tl.sum(tl.where(valid, ex, 0.0), 1), 0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e, mask=valid, other=0.0)
    choice = tl.where(valid, choice, float("-inf"))
    if GROUP != 0:  # 1: a group scores its max; 2: the sum of its top two
        m1 = tl.max(choice, 1)  # [G]
        gs = m1
        if GROUP == 2:
            first = tl.argmax(choice, 1)
            m2 = tl.max(tl.where(j == first[:, None], float("-inf"), choice), 1)
            gs = m1 + m2
        gs = tl.where(tl.arange(0, BLOCK_G) < N_GROUP, gs, float("-inf"))
        keep = tl.zeros((BLOCK_G,), tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(gs, 0)
            keep = keep | (tl.arange(0, BLOCK_G) == best)
            gs = tl.where(tl.arange(0, BLOCK_G) == best, float("-inf"), gs)
        choice = tl.where(keep[:, None], choice, float("-inf"))  # -inf, not 0: biases may be negative
    flat_choice = tl.reshape(choice, (BLOCK_G * BLOCK_EG,))
    flat_scores = tl.reshape(tl.where(valid, scores, 0.0), (BLOCK_G * BLOCK_EG,))
    flat_e = tl.reshape(e, (BLOCK_G * BLOCK_EG,))
    kk = tl.arange(0, BLOCK_K)
    weights = tl.zeros((BLOCK_K,), tl.float32)
    ids = tl.zeros((BLOCK_K,), tl.int64)
    for i in tl.static_range(TOP_K):
        best = tl.argmax(flat_choice, 0)
        hit = tl.arange(0, BLOCK_G * BLOCK_EG) == best
        weights = tl.where(kk == i, tl.sum(tl.where(hit, flat_scores, 0.0), 0), weights)
        ids = tl.where(kk == i, tl.sum(tl.where(hit, flat_e, 0), 0).to(tl.int64), ids)
        flat_choice = tl.where(hit, float("-inf"), flat_choice)
    if NORM:
        weights = weights / (tl.sum(weights, 0) + 1e-20)
    tl.store(w_ptr + t * TOP_K + kk, weights * route_scale, mask=kk < TOP_K)
    tl.store(ids_ptr + t * TOP_K + kk, ids, mask=kk < TOP_K)


GROUP_SCORES = {"none": 0, "max": 1, "top2_sum": 2}


def gate_select(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
                scoring_func: str, group_score: str, norm_topk_prob: bool, route_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 (x · gateᵀ) -> (weights [T, k] fp32, ids [T, k] int64), as ReferenceKernels.moe_gate."""
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
        _gate_select_kernel[(T,)](logits, b, weights, ids, E, E // groups, groups, float(route_scale),
                                  TOPK_GROUP=topk_group if grouped else 1, TOP_K=top_k,
                                  SIGMOID=scoring_func == "sigmoid", GROUP=GROUP_SCORES[group_score] if grouped else 0,
                                  HAS_BIAS=bias is not None, NORM=norm_topk_prob and top_k > 1,
                                  BLOCK_G=triton.next_power_of_2(groups), BLOCK_EG=triton.next_power_of_2(E // groups),
                                  BLOCK_K=triton.next_power_of_2(top_k), enable_fp_fusion=FP_FUSION)
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
