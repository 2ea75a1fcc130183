"""The torch_npu emulation (or, on Ascend hardware, the real ops) against the formulas in
shared/reference/ascend-ops.md, written out here in float64 independently of dsv3's backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def gen(seed):
    return torch.Generator().manual_seed(seed)


def close(got, ref, tol, what):
    err = (got.double().cpu() - ref.double()).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"{what}: max error {err:.3e}"


def test_rms_norm(npu):
    x, g = torch.randn(2, 3, 200, generator=gen(0)), torch.randn(200, generator=gen(1))
    y, rstd = npu.torch_npu.npu_rms_norm(x.to(npu.device), g.to(npu.device), epsilon=1e-6)
    xd = x.double()
    r = 1 / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6)
    close(y, xd * r * g.double(), 1e-5, "y")
    close(rstd.reshape(r.shape), r, 1e-5, "rstd")


def test_rotary_mul_modes(npu):
    x = torch.randn(2, 5, 3, 8, generator=gen(2))
    ang = torch.rand(2, 5, 1, 4, generator=gen(3)) * 6
    xd = x.double()
    # interleave: pairs rotate as complex numbers by their angle
    c, s = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    got = npu.torch_npu.npu_rotary_mul(x.to(npu.device), c.to(npu.device), s.to(npu.device), rotary_mode="interleave")
    z = torch.view_as_complex(xd.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(ang.double()), ang.double())
    close(got, torch.view_as_real(z).flatten(-2), 1e-5, "interleave")
    # half: the first half pairs with the second
    c, s = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    got = npu.torch_npu.npu_rotary_mul(x.to(npu.device), c.to(npu.device), s.to(npu.device), rotary_mode="half")
    a, b = xd[..., :4], xd[..., 4:]
    ref = torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)
    close(got, ref, 1e-5, "half")


def test_interleave_rope_is_interleaved_rotation_then_evens_odds(npu):
    x = torch.randn(2, 3, 5, 64, generator=gen(4)).bfloat16()  # (B, N, S, D)
    ang = torch.rand(2, 1, 5, 32, generator=gen(5)) * 6
    c, s = torch.cat([ang.cos()] * 2, -1).bfloat16(), torch.cat([ang.sin()] * 2, -1).bfloat16()
    got = npu.torch_npu.npu_interleave_rope(x.to(npu.device), c.to(npu.device), s.to(npu.device))
    z = torch.view_as_complex(x.double().unflatten(-1, (32, 2)).contiguous())
    rot = z * torch.polar(torch.ones(ang.shape, dtype=torch.float64), ang.double())
    ref = torch.cat([rot.real, rot.imag], -1)  # evens (real parts) first, then odds
    close(got, ref, 2e-2, "interleave_rope")


def attention_formula(q, k, v, scale, masked):
    """q [S, N, D], k/v [T, N, D], masked [S, T] True = masked -> [S, N, Dv] in float64."""
    sc = torch.einsum("snd,tnd->nst", q.double(), k.double()) * scale
    if masked is not None:
        sc = sc.masked_fill(masked, float("-inf"))
    return torch.einsum("nst,tnd->snd", sc.softmax(-1), v.double())


def test_fused_attention_bsnd_with_mask(npu):
    B, S, T, N, D = 2, 3, 7, 4, 16
    q, k, v = (torch.randn(B, L, N, D, generator=gen(6 + i)) for i, L in enumerate((S, T, T)))
    masked = torch.rand(B, 1, S, T, generator=gen(9)) < 0.3
    masked[..., -1] = False  # every query sees one key
    out, _ = npu.torch_npu.npu_fused_infer_attention_score(
        q.to(npu.device), k.to(npu.device), v.to(npu.device), atten_mask=masked.to(npu.device), num_heads=N,
        scale=0.3, input_layout="BSND", sparse_mode=0)
    for b in range(B):
        close(out[b], attention_formula(q[b], k[b], v[b], 0.3, masked[b, 0]), 1e-5, f"batch {b}")


def test_fused_attention_tnd_right_down_causal_with_cumulative_lengths(npu):
    lens_q, lens_kv, N, D, Dv = [3, 5], [6, 5], 2, 24, 16
    q = torch.randn(sum(lens_q), N, D, generator=gen(10)).bfloat16()
    k = torch.randn(sum(lens_kv), N, D, generator=gen(11)).bfloat16()
    v = torch.randn(sum(lens_kv), N, Dv, generator=gen(12)).bfloat16()
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    out, _ = npu.torch_npu.npu_fused_infer_attention_score(
        q.to(npu.device), k.to(npu.device), v.to(npu.device), atten_mask=mask.to(npu.device),
        actual_seq_lengths=[3, 8], actual_seq_lengths_kv=[6, 11], num_heads=N, scale=0.2, input_layout="TND",
        sparse_mode=3)
    sq, sk = 0, 0
    for lq, lk in zip(lens_q, lens_kv):
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        ref = attention_formula(q[sq:sq + lq], k[sk:sk + lk], v[sk:sk + lk], 0.2, j > i + (lk - lq))
        close(out[sq:sq + lq], ref, 2e-2, f"sequence of {lq} queries over {lk} keys")
        sq, sk = sq + lq, sk + lk


def test_fused_attention_mla_form_one_kv_head_with_rope_parts(npu):
    B, S, T, N, C, R = 1, 1, 9, 4, 32, 16
    q, qr = torch.randn(B, S, N, C, generator=gen(13)), torch.randn(B, S, N, R, generator=gen(14))
    kv, kr = torch.randn(B, T, 1, C, generator=gen(15)), torch.randn(B, T, 1, R, generator=gen(16))
    d = npu.device
    out, _ = npu.torch_npu.npu_fused_infer_attention_score(
        q.to(d), kv.to(d), kv.to(d), query_rope=qr.to(d), key_rope=kr.to(d), num_heads=N, num_key_value_heads=1,
        scale=0.1, input_layout="BSND", sparse_mode=0)
    sc = (torch.einsum("snc,tc->nst", q[0].double(), kv[0, :, 0].double())
          + torch.einsum("snr,tr->nst", qr[0].double(), kr[0, :, 0].double())) * 0.1
    close(out[0], torch.einsum("nst,tc->snc", sc.softmax(-1), kv[0, :, 0].double()), 1e-5, "mla")


def test_gating_top_k_deepseek_v3(npu):
    T, E, G, KG, K = 5, 32, 8, 4, 8
    x = torch.randn(T, E, generator=gen(17))
    bias = torch.randn(E, generator=gen(18)) * 0.5
    y, idx, _ = npu.torch_npu.npu_moe_gating_top_k(
        x.to(npu.device), K, bias=bias.to(npu.device), k_group=KG, group_count=G, group_select_mode=1, renorm=0,
        norm_type=1, out_flag=False, routed_scaling_factor=2.5, eps=1e-20)
    assert idx.dtype == torch.int32
    for t in range(T):  # plain loop over the documented steps
        s = torch.sigmoid(x[t].double())
        sb = s + bias.double()
        group_score = [sorted(sb[g * 4:(g + 1) * 4].tolist())[-2:] for g in range(G)]
        best = sorted(range(G), key=lambda g: -sum(group_score[g]))[:KG]
        allowed = [e for e in range(E) if e // 4 in best]
        chosen = sorted(allowed, key=lambda e: -sb[e].item())[:K]
        assert sorted(idx[t].tolist()) == sorted(chosen)
        w = s[idx[t].long().cpu()]
        close(y[t], w / w.sum() * 2.5, 1e-5, f"token {t} weights")


def test_gating_top_k_softmax_without_renorm(npu):
    x = torch.randn(4, 12, generator=gen(19))
    y, idx, _ = npu.torch_npu.npu_moe_gating_top_k(x.to(npu.device), 2, k_group=1, group_count=1, norm_type=0,
                                                   routed_scaling_factor=1.0)
    s = x.double().softmax(-1)
    assert (idx.cpu().long() == s.topk(2, dim=-1).indices).all()
    close(y, s.topk(2, dim=-1).values, 1e-5, "softmax weights")


def test_init_routing_v2_sorts_rows_by_expert(npu):
    x = torch.randn(4, 6, generator=gen(20))
    idx = torch.tensor([[2, 0], [1, 2], [0, 3], [2, 1]], dtype=torch.int32)
    ex, row_idx, counts, _ = npu.torch_npu.npu_moe_init_routing_v2(
        x.to(npu.device), idx.to(npu.device), active_num=8, expert_num=4, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, row_idx_type=0)
    assert counts.tolist() == [2, 2, 3, 1] and row_idx.dtype == torch.int32
    flat = idx.flatten().tolist()
    perm = sorted(range(8), key=lambda j: (flat[j], j))  # stable sort by expert
    for i, j in enumerate(perm):
        assert torch.equal(ex[i].cpu(), x[j // 2])  # expanded_x = x[perm // k]
        assert row_idx[j] == i  # row_idx_type 0: expanded_row_idx[perm[i]] = i
    _, _, cum, _ = npu.torch_npu.npu_moe_init_routing_v2(
        x.to(npu.device), idx.to(npu.device), active_num=8, expert_num=4, expert_tokens_num_type=0,
        expert_tokens_num_flag=True)
    assert cum.tolist() == [2, 4, 7, 8]


@pytest.mark.parametrize("group_list_type,group_list", [(1, [2, 0, 3]), (0, [2, 2, 5])])
def test_grouped_matmul_split_along_m(npu, group_list_type, group_list):
    x = torch.randn(5, 8, generator=gen(21)).bfloat16()
    w = torch.randn(3, 6, 8, generator=gen(22)).bfloat16()  # [E, N, K] storage, passed as its [E, K, N] view
    y = npu.torch_npu.npu_grouped_matmul([x.to(npu.device)], [w.to(npu.device).transpose(1, 2)],
                                         group_list=torch.tensor(group_list).to(npu.device), split_item=2,
                                         group_type=0, group_list_type=group_list_type)[0]
    ref = torch.cat([x[:2].double() @ w[0].double().T, x[2:5].double() @ w[2].double().T])
    close(y, ref, 2e-2, "grouped matmul")


def test_swiglu(npu):
    x = torch.randn(3, 10, generator=gen(23))
    close(npu.torch_npu.npu_swiglu(x.to(npu.device), dim=-1), F.silu(x[:, :5].double()) * x[:, 5:].double(), 1e-5,
          "swiglu")
