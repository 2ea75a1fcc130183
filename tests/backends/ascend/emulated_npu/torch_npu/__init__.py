"""A stand-in `torch_npu` for tests on machines without Ascend hardware.

Each op follows the documented semantics in shared/reference/ascend-ops.md (argument names and
order, layouts, the 1 = masked convention, cumulative sequence lengths, group_list conventions,
the interleave permutation, int32 indices), written in plain torch on whatever device the inputs
are on. It implements what the documentation says, not what dsv3's backend expects: its own tests
(test_emulation.py) check it against the formulas. It lives in the test tree and is put on
sys.path under the name `torch_npu` only by the tests that say "emulated" in their names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__version__ = "2.13.0+emulated"
EMULATED = True  # for test reports only; dsv3 never reads it


# ---- norms ------------------------------------------------------------------------------------------
def npu_rms_norm(x, gamma, epsilon=1e-6):
    """(y, rstd): y = x / sqrt(mean(x², last dim) + eps) · gamma, rstd fp32 over the leading dims."""
    if not 2 <= x.dim() <= 8:
        raise RuntimeError(f"npu_rms_norm: x must be 2-8 D, got {x.dim()}")
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


# ---- rotary embedding ---------------------------------------------------------------------------------
def npu_rotary_mul(x, r1, r2, rotary_mode="half"):
    """out = x·r1 + rotate(x)·r2; 'half': rotate = cat(-x2, x1); 'interleave': (x0, x1) -> (-x1, x0)."""
    if x.dim() not in (3, 4) or x.shape[-1] % 2 or x.shape[-1] >= 896:
        raise RuntimeError(f"npu_rotary_mul: x must be 3-D/4-D with even D < 896, got {list(x.shape)}")
    xf = x.float()
    if rotary_mode == "half":
        a, b = xf.chunk(2, dim=-1)
        rot = torch.cat([-b, a], dim=-1)
    elif rotary_mode == "interleave":
        pairs = xf.unflatten(-1, (-1, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        raise RuntimeError(f"npu_rotary_mul: unknown rotary_mode {rotary_mode!r}")
    return (xf * r1.float() + rot * r2.float()).to(x.dtype)


def npu_interleave_rope(x, cos, sin):
    """x (B, N, S, 64) bf16/fp16: de-interleave each head, then q·cos + rotate_half(q)·sin.

    cos/sin are (B or 1, 1, S or 1, 64) laid out [c0..c31, c0..c31]. The output stays in the
    de-interleaved order."""
    if x.dim() != 4 or x.shape[-1] != 64:
        raise RuntimeError(f"npu_interleave_rope: x must be (B, N, S, 64), got {list(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"npu_interleave_rope: x must be bf16 or fp16, got {x.dtype}")
    if cos.dim() != 4 or cos.shape[1] != 1 or cos.shape[-1] != 64 or sin.shape != cos.shape:
        raise RuntimeError(f"npu_interleave_rope: cos/sin must be (B|1, 1, S|1, 64), got {list(cos.shape)}")
    q = x.float().unflatten(-1, (32, 2)).transpose(-1, -2).flatten(-2)  # [x0, x2, ..., x62, x1, x3, ..., x63]
    a, b = q.chunk(2, dim=-1)
    return (q * cos.float() + torch.cat([-b, a], dim=-1) * sin.float()).to(x.dtype)


# ---- attention --------------------------------------------------------------------------------------------
def _attend(q, k, v, scale, masked, q_rope=None, k_rope=None):
    """q [N, S, D], k [N, T, D], v [N, T, Dv], masked [S, T] bool (True = masked) or None -> ([N, S, Dv], lse [N, S])."""
    scores = torch.einsum("nsd,ntd->nst", q.float(), k.float())
    if q_rope is not None:
        scores = scores + torch.einsum("nsd,ntd->nst", q_rope.float(), k_rope.float())
    scores = scores * scale
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("nst,ntd->nsd", scores.softmax(-1), v.float()), lse


def _sparse_mask(sparse_mode, atten_mask, s, t):
    """[S, T] True = masked for one sequence, from the documented sparse modes."""
    if sparse_mode == 0:
        return None if atten_mask is None else atten_mask.bool()
    if sparse_mode in (2, 3):
        if atten_mask is None or tuple(atten_mask.shape[-2:]) != (2048, 2048):
            raise RuntimeError("npu_fused_infer_attention_score: sparse_mode 2/3 need the 2048x2048 triu mask")
        offset = 0 if sparse_mode == 2 else t - s  # 2: left-up causal, 3: right-down causal
        i, j = torch.arange(s)[:, None], torch.arange(t)[None, :]
        return (j > i + offset).to(atten_mask.device)
    raise RuntimeError(f"npu_fused_infer_attention_score: sparse_mode {sparse_mode} is not emulated")


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, block_table=None, query_rope=None, key_rope=None,
                                    num_heads=1, scale=1.0, input_layout="BSH", num_key_value_heads=0,
                                    sparse_mode=0, block_size=0, softmax_lse_flag=False, **_):
    """softmax(scale·(Q Kᵀ [+ Q_rope K_ropeᵀ]) + mask) · V, mask 1 = masked out. Returns (out, softmax_lse)."""
    if block_table is not None:
        raise RuntimeError("npu_fused_infer_attention_score: paged KV (block_table) is not emulated")
    layout_in = input_layout.split("_")[0]
    kv_heads = num_key_value_heads or num_heads
    if num_heads % kv_heads:
        raise RuntimeError(f"num_heads={num_heads} is not a multiple of num_key_value_heads={kv_heads}")
    group = num_heads // kv_heads

    def expand(t):  # [N_kv, T, D] -> [N, T, D]
        return t.repeat_interleave(group, dim=0) if t is not None else None

    if layout_in == "TND":
        if query.dtype != torch.bfloat16:
            raise RuntimeError("npu_fused_infer_attention_score: TND supports bf16 only")
        ends_q, ends_kv = list(actual_seq_lengths), list(actual_seq_lengths_kv)
        outs, lses, start_q, start_kv = [], [], 0, 0
        for eq, ekv in zip(ends_q, ends_kv):  # cumulative ends, one per batch entry
            sl = lambda t, a, b: None if t is None else t[a:b].transpose(0, 1)
            q, qr = sl(query, start_q, eq), sl(query_rope, start_q, eq)
            k, v, kr = sl(key, start_kv, ekv), sl(value, start_kv, ekv), sl(key_rope, start_kv, ekv)
            masked = _sparse_mask(sparse_mode, atten_mask, eq - start_q, ekv - start_kv)
            o, lse = _attend(q, expand(k), expand(v), scale, masked, qr, expand(kr))
            outs.append(o.transpose(0, 1))
            lses.append(lse.transpose(0, 1))
            start_q, start_kv = eq, ekv
        return torch.cat(outs).to(query.dtype), torch.cat(lses)[..., None]
    if layout_in not in ("BSND", "BNSD", "BSH"):
        raise RuntimeError(f"npu_fused_infer_attention_score: layout {input_layout} is not emulated")

    def to_bnsd(t, heads):
        if t is None:
            return None
        if layout_in == "BSH":
            t = t.unflatten(-1, (heads, -1))
        return t.transpose(1, 2) if layout_in in ("BSH", "BSND") else t

    q, qr = to_bnsd(query, num_heads), to_bnsd(query_rope, num_heads)
    k, v, kr = to_bnsd(key, kv_heads), to_bnsd(value, kv_heads), to_bnsd(key_rope, kv_heads)
    b, _, s, _ = q.shape
    t = k.shape[2]
    outs, lses = [], []
    for i in range(b):
        if sparse_mode == 0 and atten_mask is not None:
            m = atten_mask.bool()
            m = m.reshape(-1, *m.shape[-2:])  # (B, 1, S, T), (B, S, T) or (S, T)
            masked = m[i if m.shape[0] > 1 else 0]
        else:
            masked = _sparse_mask(sparse_mode, atten_mask, s, t)
        o, lse = _attend(q[i], expand(k[i]), expand(v[i]), scale, masked, None if qr is None else qr[i],
                         None if kr is None else expand(kr[i]))
        outs.append(o)
        lses.append(lse)
    out, lse = torch.stack(outs), torch.stack(lses)  # [B, N, S, Dv]
    layout_out = input_layout.split("_")[-1]
    if layout_out == "BSND":
        out = out.transpose(1, 2)
    elif layout_out == "BSH":
        out = out.transpose(1, 2).flatten(2)
    return out.to(query.dtype), lse[..., None]


# ---- MoE routing ----------------------------------------------------------------------------------------
def npu_moe_gating_top_k(x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0, renorm=0, norm_type=0,
                         out_flag=False, routed_scaling_factor=1.0, eps=1e-20, **_):
    """(y, expert_idx int32, norm_out fp32): softmax (norm_type 0) or sigmoid (1), +bias for selection only,
    group score max (mode 0) or top-2 sum (mode 1), best k_group groups, top-k; norm_type 1 renormalizes."""
    if x.dim() != 2:
        raise RuntimeError("npu_moe_gating_top_k: x must be 2-D (tokens, experts)")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError(f"npu_moe_gating_top_k: bias dtype {bias.dtype} must equal x's {x.dtype}")
    n_exp = x.shape[1]
    if n_exp % group_count or n_exp // group_count <= 2:
        raise RuntimeError(f"npu_moe_gating_top_k: {n_exp} experts in {group_count} groups; need > 2 per group")
    xf = x.float()
    s = xf.softmax(-1) if norm_type == 0 else xf.sigmoid()
    sb = s if bias is None else s + bias.float()
    if group_count > 1:
        g = sb.unflatten(-1, (group_count, -1))
        score = g.amax(-1) if group_select_mode == 0 else g.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k_group, dim=-1).indices, True)
        sb = g.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    idx = sb.topk(k, dim=-1).indices
    y = s.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), (s if out_flag else torch.empty(0))


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=None, row_idx_type=0, **_):
    """(expanded_x, expanded_row_idx int32, expert_tokens, expanded_scale): rows sorted by expert (stable),
    expanded_x = x[perm // k]; row_idx_type 0: expanded_row_idx[perm[i]] = i."""
    if expert_idx.dtype != torch.int32:
        raise RuntimeError(f"npu_moe_init_routing_v2: expert_idx must be int32, got {expert_idx.dtype}")
    k = expert_idx.shape[1]
    flat = expert_idx.flatten().long()
    perm = torch.argsort(flat, stable=True)
    expanded_x = x[perm // k]
    if row_idx_type == 0:
        row_idx = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    else:
        row_idx = perm
    tokens = None
    if expert_tokens_num_flag:
        counts = torch.bincount(flat, minlength=expert_num if expert_num > 0 else int(flat.max()) + 1)
        tokens = counts if expert_tokens_num_type == 1 else torch.cumsum(counts, 0)
    if 0 <= active_num < expanded_x.shape[0]:
        expanded_x = expanded_x[:active_num]
    return expanded_x, row_idx.to(torch.int32), tokens, None


def npu_grouped_matmul(x, weight, *, bias=None, group_list=None, split_item=0, group_type=None, group_list_type=0,
                       act_type=0, **_):
    """y_g = x_g @ weight_g (weight [K, N] per group, or one [E, K, N] tensor); group_type 0 splits x along M;
    group_list_type 0 = cumulative ends, 1 = counts; split_item 2/3 = one output tensor."""
    if group_type not in (0, None) or len(x) != 1:
        raise RuntimeError("npu_grouped_matmul: only one x split along M (group_type 0) is emulated")
    xs = x[0]
    weights = list(weight[0]) if len(weight) == 1 and weight[0].dim() == 3 else list(weight)
    gl = torch.as_tensor(group_list).tolist()
    ends = gl if group_list_type == 0 else torch.cumsum(torch.tensor(gl), 0).tolist()
    if len(ends) != len(weights):
        raise RuntimeError(f"npu_grouped_matmul: {len(ends)} groups for {len(weights)} weights")
    outs, start = [], 0
    for end, w in zip(ends, weights):
        outs.append((xs[start:end].float() @ w.float()).to(xs.dtype))
        start = end
    if start != xs.shape[0]:
        raise RuntimeError(f"npu_grouped_matmul: group_list covers {start} rows of {xs.shape[0]}")
    return [torch.cat(outs)] if split_item in (2, 3) else outs


def npu_swiglu(x, dim=-1):
    """silu(a) · b for the two halves a, b of x along dim (a first)."""
    a, b = x.chunk(2, dim=dim)
    return (F.silu(a.float()) * b.float()).to(x.dtype)


def npu_format_cast(x, fmt):
    return x  # layouts are a device concern; ND everywhere on CPU


