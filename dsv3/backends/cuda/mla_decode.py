"""Absorbed MLA attention over the latent cache (decode, and any S with a mask).

out[b, s, h] = softmax_t(scale · (q_latent·kv[t] + q_pe·pe[t]) | mask) · kv[t]. One program owns a
block of heads of one query and a slice of the keys (split-K, "flash decoding"): every head of a
token shares the same latent rows, so they are read once per head block, not once per head. The
splits are merged in torch by their log-sum-exp.

A position step (decode, draft verification) passes each query's own position (`last`, the step's write
positions: no extra launch) instead of a mask: a slice stops there, so keys past it are never read and the
step's span (a graph's fixed one, or a server's whole cache) costs only idle programs. With `rows`, kv and pe
are a whole slot cache and sequence b reads its slot in place (a server's batch is any set of slots).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jit import dot
from .launch import FP_FUSION, attn_config, check_target, interpreted, sm_count


@triton.jit
def _mla_decode_kernel(ql_ptr, qp_ptr, kv_ptr, pe_ptr, mask_ptr, last_ptr, rows_ptr, o_ptr, lse_ptr,
                       S, H, T, C, R, scale, split_len, n_splits,
                       sq_b, sq_s, sq_h, sp_b, sp_s, sp_h, skv_b, skv_t, spe_b, spe_t, sm_b, sm_s,
                       HAS_MASK: tl.constexpr, HAS_LAST: tl.constexpr, HAS_ROWS: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
    bs, hb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, s = (bs // S).to(tl.int64), (bs % S).to(tl.int64)
    slot = b
    if HAS_ROWS:  # a slot of the whole cache, read in place
        slot = tl.load(rows_ptr + b).to(tl.int64)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    rc, rr = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    in_h = heads < H
    q = tl.load(ql_ptr + b * sq_b + s * sq_s + heads[:, None] * sq_h + rc[None, :],
                mask=in_h[:, None] & (rc[None, :] < C), other=0.0)  # [BH, BC]
    qp = tl.load(qp_ptr + b * sp_b + s * sp_s + heads[:, None] * sp_h + rr[None, :],
                 mask=in_h[:, None] & (rr[None, :] < R), other=0.0)  # [BH, BR]
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), tl.float32)
    lo = sp * split_len
    hi = tl.minimum(lo + split_len, T)
    if HAS_LAST:  # the query sees keys up to its own position: a slice past it reads nothing
        hi = tl.minimum(hi, tl.load(last_ptr + b * S + s).to(tl.int32) + 1)
    for t0 in range(lo, hi, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        keep = ts < hi
        if HAS_MASK:
            keep &= tl.load(mask_ptr + b * sm_b + s * sm_s + ts, mask=keep, other=0) != 0
        kv = tl.load(kv_ptr + slot * skv_b + ts[:, None] * skv_t + rc[None, :],
                     mask=(ts[:, None] < hi) & (rc[None, :] < C), other=0.0)  # [BT, BC]
        pe = tl.load(pe_ptr + slot * spe_b + ts[:, None] * spe_t + rr[None, :],
                     mask=(ts[:, None] < hi) & (rr[None, :] < R), other=0.0)  # [BT, BR]
        score = dot(q, tl.trans(kv), tl.zeros((BLOCK_H, BLOCK_T), tl.float32), UPCAST)
        score = dot(qp, tl.trans(pe), score, UPCAST) * scale
        score = tl.where(keep[None, :], score, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(score, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep zeros, not NaN
        p = tl.exp(score - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = dot(p.to(kv.dtype), kv, acc * alpha[:, None], UPCAST)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
    row = bs * n_splits + sp
    tl.store(o_ptr + (row * H + heads[:, None]) * C + rc[None, :], out.to(o_ptr.dtype.element_ty),
             mask=in_h[:, None] & (rc[None, :] < C))
    tl.store(lse_ptr + row * H + heads, lse, mask=in_h)


def _splits(work: int, t: int, block_t: int, target: str, device: torch.device) -> int:
    """Enough key slices to give the GPU ~2 programs per SM; one or two on the interpreter."""
    if device.type != "cuda":
        return 1 if t <= 4 * block_t else 2
    sms = sm_count(target, device)  # cached per device: this runs every layer of every decode step
    return max(1, min(triton.cdiv(2 * sms, work), triton.cdiv(t, 4 * block_t), 64))


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, scale: float,
               mask: torch.Tensor | None = None, target: str = "nvidia", last: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """q_latent [B, S, H, C], q_pe [B, S, H, R], kv [B, T, C], pe [B, T, R], mask [B, S, T] bool (True = visible) or
    None; or last [B, S] int64 (query (b, s) sees keys 0 .. last[b, s]; the mask is then not read). rows [B]
    int64: kv [slots, T, C] and pe [slots, T, R] are a whole slot cache, sequence b reads slot rows[b]."""
    check_target(target)
    B, S, H, C = q_latent.shape
    T, R = kv.shape[1], pe.shape[-1]
    slots = kv.shape[0] if rows is not None else B
    if (q_pe.shape[:3] != (B, S, H) or kv.shape[0] != slots or kv.shape[2] != C
            or tuple(pe.shape[:2]) != (slots, T)):
        raise ValueError(f"mla_decode: q_latent {list(q_latent.shape)}, q_pe {list(q_pe.shape)}, kv {list(kv.shape)}, "
                         f"pe {list(pe.shape)} do not fit [B, S, H, C], [B, S, H, R], [B, T, C], [B, T, R] (B = slots "
                         "with rows)")
    if rows is not None and (tuple(rows.shape) != (B,) or rows.dtype != torch.int64):
        raise ValueError(f"mla_decode: rows {rows.dtype} {list(rows.shape)}; expected int64 [{B}]")
    if last is not None and (tuple(last.shape) != (B, S) or last.dtype != torch.int64 or not last.is_contiguous()):
        raise ValueError(f"mla_decode: last {last.dtype} {list(last.shape)}; expected contiguous int64 [{B}, {S}]")
    if last is not None:
        mask = None
    if mask is not None and (tuple(mask.shape) != (B, S, T) or mask.stride(-1) != 1):
        raise ValueError(f"mla_decode: mask {list(mask.shape)}; expected [{B}, {S}, {T}] with unit stride in T")
    if any(t.stride(-1) != 1 for t in (q_latent, q_pe, kv, pe)):
        raise ValueError("mla_decode: the last dim of q_latent, q_pe, kv and pe must be contiguous")
    cfg = attn_config(target, C, R, kv.element_size(), kv.device)  # fp32 caches take fewer keys per step
    if cfg is None:
        raise ValueError(f"mla_decode: a {kv.dtype} cache at C={C}, R={R} does not fit this GPU's shared memory even "
                         "16 keys at a time; use a bf16 cache (--dtype bf16)")
    n_h = triton.cdiv(H, cfg.block_h)
    n_splits = _splits(B * S * n_h, T, cfg.block_t, target, kv.device)
    split_len = triton.cdiv(triton.cdiv(T, n_splits), cfg.block_t) * cfg.block_t
    n_splits = triton.cdiv(T, split_len)
    # one slice: the kernel writes the answer in q's dtype; several: fp32 partials merged by one more launch
    o = torch.empty(B * S * n_splits, H, C, dtype=torch.float32 if n_splits > 1 else q_latent.dtype, device=kv.device)
    lse = torch.empty(B * S * n_splits, H, dtype=torch.float32, device=kv.device)
    m = mask if mask is not None else kv  # any tensor: never read without HAS_MASK
    sm = (m.stride(0), m.stride(1)) if mask is not None else (0, 0)
    _mla_decode_kernel[(B * S, n_h, n_splits)](
        q_latent, q_pe, kv, pe, m, last if last is not None else kv, rows if rows is not None else kv, o, lse,
        S, H, T, C, R, float(scale), split_len, n_splits,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1), *sm,
        HAS_MASK=mask is not None, HAS_LAST=last is not None, HAS_ROWS=rows is not None, BLOCK_H=cfg.block_h, BLOCK_T=cfg.block_t, BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_R=max(16, triton.next_power_of_2(R)), UPCAST=interpreted(kv.device) and kv.dtype != torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)
    if n_splits == 1:
        return o.view(B, S, H, C)
    out = torch.empty(B, S, H, C, dtype=q_latent.dtype, device=kv.device)
    _merge_kernel[(B * S, H)](o, lse, out, H, C, n_splits, BLOCK_S=triton.next_power_of_2(n_splits),
                              BLOCK_C=max(16, triton.next_power_of_2(C)), enable_fp_fusion=FP_FUSION)
    return out


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, H, C, n_splits, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[q, h] = Σ_i exp(lse_i - lse) · o_i over the key slices i of one (query, head): the weights of a
    softmax over the slices' log-sum-exps (slices that saw no visible key have lse = -inf and weight 0)."""
    q, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    lse = tl.load(lse_ptr + (q * n_splits + i) * H + h, mask=i < n_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0)
    w = w / tl.maximum(tl.sum(w, 0), 1e-30)
    o = tl.load(o_ptr + ((q * n_splits + i[:, None]) * H + h) * C + c[None, :],
                mask=(i[:, None] < n_splits) & (c[None, :] < C), other=0.0)
    tl.store(out_ptr + (q * H + h) * C + c, tl.sum(o * w[:, None], 0).to(out_ptr.dtype.element_ty), mask=c < C)


@torch.library.custom_op("dsv3::mla_decode", mutates_args=())
def mla_decode_op(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, scale: float,
                  mask: torch.Tensor | None, target: str, last: torch.Tensor | None = None,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    return mla_decode(q_latent, q_pe, kv, pe, scale, mask, target, last, rows)


@mla_decode_op.register_fake
def _(q_latent, q_pe, kv, pe, scale, mask, target, last=None, rows=None):
    return q_latent.new_empty(q_latent.shape)
