"""The MLA prologue of a position step in one launch: kv_norm, both ropes and the two cache writes.

For each token (b, s): the latent kv row [C] is RMS-normed and written to kv_cache[rows[b], pos[b, s]],
the rope part of the key [R] is rotated and written to pe_cache at the same place, and the rope part of
every head's query [H, R] is rotated and returned. Interleaved pairs, fp32 math, one rounding per value,
as the reference's rms_norm and rope. Reference: dsv3.core.kernels.Kernels.mla_latent (composed of the
reference's rms_norm, rope and index_put_: six launches and a copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jit import rms_row
from .launch import FP_FUSION


@triton.jit
def _latent_kernel(q_ptr, kv_ptr, kpe_ptr, w_ptr, cos_ptr, sin_ptr, kvc_ptr, pec_ptr, rows_ptr, pos_ptr, out_ptr,
                   S, H, C, eps, sq_b, sq_s, sq_h, skv_b, skv_s, skp_b, skp_s, skvc_slot, skvc_t, spec_slot, spec_t,
                   HALF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    b, s = (t // S).to(tl.int64), (t % S).to(tl.int64)
    slot = tl.load(rows_ptr + b).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    # kv_norm, then the write
    c = tl.arange(0, BLOCK_C)
    x = tl.load(kv_ptr + b * skv_b + s * skv_s + c, mask=c < C, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    y = rms_row(x, w, C, eps)  # as rms_norm.py: the same bits as a cache-free forward's kv_norm
    tl.store(kvc_ptr + slot * skvc_slot + p * skvc_t + c, y.to(kvc_ptr.dtype.element_ty), mask=c < C)
    # the angles of this position, shared by the key and every head of the query
    j = tl.arange(0, BLOCK_P)
    cs = tl.load(cos_ptr + t * HALF + j, mask=j < HALF, other=0.0)
    sn = tl.load(sin_ptr + t * HALF + j, mask=j < HALF, other=0.0)
    k0 = tl.load(kpe_ptr + b * skp_b + s * skp_s + 2 * j, mask=j < HALF, other=0.0).to(tl.float32)
    k1 = tl.load(kpe_ptr + b * skp_b + s * skp_s + 2 * j + 1, mask=j < HALF, other=0.0).to(tl.float32)
    dst = pec_ptr + slot * spec_slot + p * spec_t + 2 * j
    tl.store(dst, (k0 * cs - k1 * sn).to(pec_ptr.dtype.element_ty), mask=j < HALF)
    tl.store(dst + 1, (k0 * sn + k1 * cs).to(pec_ptr.dtype.element_ty), mask=j < HALF)
    h = tl.arange(0, BLOCK_H)[:, None]
    inside = (h < H) & (j[None, :] < HALF)
    src = q_ptr + b * sq_b + s * sq_s + h * sq_h + 2 * j[None, :]
    q0 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    q1 = tl.load(src + 1, mask=inside, other=0.0).to(tl.float32)
    out = out_ptr + t * H * 2 * HALF + h * 2 * HALF + 2 * j[None, :]
    tl.store(out, (q0 * cs[None, :] - q1 * sn[None, :]).to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(out + 1, (q0 * sn[None, :] + q1 * cs[None, :]).to(out_ptr.dtype.element_ty), mask=inside)


def mla_latent(q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, weight: torch.Tensor, eps: float,
               cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q_pe [B, S, H, R], kv [B, S, C], k_pe [B, S, R] (unit last strides: slices of projections are fine),
    weight [C], cos/sin [B, S, R/2] fp32, kv_cache [slots, T, C], pe_cache [slots, T, R] (unit last strides),
    rows [B, 1] and pos [B, S] int64 -> roped q_pe, contiguous [B, S, H, R]; the caches are written in place."""
    if q_pe.dim() != 4 or kv.dim() != 3 or k_pe.dim() != 3:
        raise ValueError(f"mla_latent: q_pe {list(q_pe.shape)}, kv {list(kv.shape)}, k_pe {list(k_pe.shape)} must be "
                         "[B, S, H, R], [B, S, C], [B, S, R]")
    B, S, H, R = q_pe.shape
    C = kv.shape[-1]
    if (tuple(kv.shape[:2]) != (B, S) or tuple(k_pe.shape) != (B, S, R) or R % 2 or tuple(weight.shape) != (C,)
            or tuple(cos.shape) != (B, S, R // 2) or cos.shape != sin.shape):
        raise ValueError(f"mla_latent: shapes do not agree: q_pe {list(q_pe.shape)}, kv {list(kv.shape)}, k_pe "
                         f"{list(k_pe.shape)}, weight {list(weight.shape)}, cos {list(cos.shape)}, sin {list(sin.shape)}")
    if (kv_cache.dim() != 3 or pe_cache.dim() != 3 or kv_cache.shape[2] != C or pe_cache.shape[2] != R
            or kv_cache.shape[:2] != pe_cache.shape[:2]):
        raise ValueError(f"mla_latent: caches {list(kv_cache.shape)} / {list(pe_cache.shape)}; expected "
                         f"[slots, T, {C}] / [slots, T, {R}]")
    if tuple(rows.shape) != (B, 1) or tuple(pos.shape) != (B, S):
        raise ValueError(f"mla_latent: rows {list(rows.shape)} / pos {list(pos.shape)}; expected [{B}, 1] / [{B}, {S}]")
    for name, t in (("q_pe", q_pe), ("kv", kv), ("k_pe", k_pe), ("kv_cache", kv_cache), ("pe_cache", pe_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"mla_latent: {name} needs a unit last stride")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    rows, pos, weight = rows.contiguous(), pos.contiguous(), weight.contiguous()
    out = torch.empty(B, S, H, R, dtype=q_pe.dtype, device=q_pe.device)
    if out.numel():
        _latent_kernel[(B * S,)](q_pe, kv, k_pe, weight, cos, sin, kv_cache, pe_cache, rows, pos, out, S, H, C,
                                 float(eps), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2), kv.stride(0), kv.stride(1),
                                 k_pe.stride(0), k_pe.stride(1), kv_cache.stride(0), kv_cache.stride(1),
                                 pe_cache.stride(0), pe_cache.stride(1), HALF=R // 2,
                                 BLOCK_C=triton.next_power_of_2(C), BLOCK_H=triton.next_power_of_2(H),
                                 BLOCK_P=triton.next_power_of_2(R // 2), enable_fp_fusion=FP_FUSION)
    return out


@torch.library.custom_op("dsv3::mla_latent", mutates_args=("kv_cache", "pe_cache"))
def mla_latent_op(q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, weight: torch.Tensor, eps: float,
                  cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                  rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return mla_latent(q_pe, kv, k_pe, weight, eps, cos, sin, kv_cache, pe_cache, rows, pos)


@mla_latent_op.register_fake
def _(q_pe, kv, k_pe, weight, eps, cos, sin, kv_cache, pe_cache, rows, pos):
    return q_pe.new_empty(q_pe.shape)
