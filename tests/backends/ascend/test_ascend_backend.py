"""The ascend backend's own code path (argument order, layouts, permutations, index conventions)
run through torch_npu: the emulation on CPU (test ids say "emulated") or the real ops on an NPU.

Op by op against the cpu reference, then the whole model against transformers' fp32 logits on
tiny released-format checkpoints over 256 positions, judged against transformers in bf16.
"""

from __future__ import annotations

import pytest
import torch
from judge import assert_generation_path, assert_no_worse
from reference import hf_logits, hf_model, write_hf_reference
from tiny_configs import ALIGNED, CONFIGS

import dsv3
from dsv3.backends.reference import ReferenceKernels
from dsv3.core.kernels import ExpertWeights, GateParams
from dsv3.synthetic import write_checkpoint

REF = ReferenceKernels()
V3_GATE = GateParams(top_k=8, n_group=8, topk_group=4, scoring_func="sigmoid", group_score="top2_sum",
                     norm_topk_prob=True, route_scale=2.5)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def kernels(npu):
    from dsv3.backends import resolve

    return resolve("ascend", npu.device)


def close(got, ref, tol, what):
    assert not got.isnan().any(), f"{what}: NaN"
    err = (got.double().cpu() - ref.double().cpu()).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert err <= tol, f"{what}: max error {err:.3e} (relative to max |ref|) > {tol:.0e}"


def test_rms_norm(npu):
    x, w = torch.randn(2, 5, 200, generator=gen(0)).bfloat16(), torch.randn(200, generator=gen(1)).bfloat16()
    close(kernels(npu).rms_norm(x.to(npu.device), w.to(npu.device), 1e-6), REF.rms_norm(x, w, 1e-6), 1e-2, "rms_norm")


@pytest.mark.parametrize("dim,dtype", [(64, torch.bfloat16), (16, torch.bfloat16), (64, torch.float32)])
def test_rope_preserves_q_dot_k(npu, dim, dtype):
    """Only q_pe·k_pe is consumed: it must equal the reference's, whatever fixed order the dims come out in."""
    q, k = torch.randn(2, 5, 3, dim, generator=gen(2)).to(dtype), torch.randn(2, 5, 1, dim, generator=gen(3)).to(dtype)
    ang = torch.rand(2, 5, dim // 2, generator=gen(4)) * 6
    K = kernels(npu)
    c, s = ang.cos().to(npu.device), ang.sin().to(npu.device)
    got = (K.rope(q.to(npu.device), c, s).float() * K.rope(k.to(npu.device), c, s).float()).sum(-1)
    ref = (REF.rope(q, ang.cos(), ang.sin()).double() * REF.rope(k, ang.cos(), ang.sin()).double()).sum(-1)
    close(got, ref, 3e-2 if dtype == torch.bfloat16 else 1e-5, f"rope D={dim} {dtype}")
    if dim == 64 and dtype == torch.bfloat16:  # the fixed permutation: evens, then odds
        perm = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])
        close(K.rope(q.to(npu.device), c, s), REF.rope(q, ang.cos(), ang.sin())[..., perm], 2e-2, "interleave order")


def causal(b, s, t, pad=None):
    q_pos = torch.arange(t - s, t)
    m = (torch.arange(t)[None, :] <= q_pos[:, None])[None].repeat(b, 1, 1)
    if pad:
        m[0, :, :pad] = False
        m[0, :pad, :] = torch.eye(t, dtype=torch.bool)[t - s:t][:pad] | m[0, :pad, :]  # pad queries see themselves
    return m


@pytest.mark.parametrize("padded,dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (False, torch.float32)])
def test_naive_attention(npu, padded, dtype):
    """Unpadded bf16 takes TND with sparse_mode 3; padded or fp32 takes BSND with the full mask."""
    B, S, T, H = 2, 6, 9, 3
    q, k = torch.randn(B, S, H, 40, generator=gen(5)), torch.randn(B, T, H, 40, generator=gen(6))
    v = torch.randn(B, T, H, 24, generator=gen(7))
    mask = causal(B, S, T, pad=2 if padded else None)
    args = [z.to(dtype) for z in (q, k, v)]
    got = kernels(npu).attention(*[z.to(npu.device) for z in args], 0.2, mask.to(npu.device))
    close(got, REF.attention(*[z.double() for z in args], 0.2, mask), 2e-2 if dtype == torch.bfloat16 else 1e-5,
          f"attention padded={padded} {dtype}")


def test_naive_attention_decides_tnd_per_mask_object(npu):
    """Masks come and go every forward; a new padded mask must never reuse a freed causal one's decision."""
    K = kernels(npu)
    B, S, H = 2, 5, 2
    q, k, v = (torch.randn(B, S, H, 16, generator=gen(20 + i)).bfloat16() for i in range(3))
    for i in range(6):
        mask = causal(B, S, S, pad=2 if i % 2 else None)  # a fresh object each time, the last one freed
        got = K.attention(q.to(npu.device), k.to(npu.device), v.to(npu.device), 0.3, mask.to(npu.device))
        close(got, REF.attention(q.double(), k.double(), v.double(), 0.3, mask), 2e-2, f"forward {i}")
        del mask, got


@pytest.mark.parametrize("heads", [3, 16])
@pytest.mark.parametrize("s", [1, 4])
def test_mla_attention_pads_heads_to_a_power_of_two(npu, heads, s):
    B, T, C, R = 2, 11, 72, 16
    ql, qp = torch.randn(B, s, heads, C, generator=gen(8)), torch.randn(B, s, heads, R, generator=gen(9))
    kv, pe = torch.randn(B, T, C, generator=gen(10)), torch.randn(B, T, R, generator=gen(11))
    mask = None if s == 1 else causal(B, s, T, pad=3)
    args = [z.bfloat16() for z in (ql, qp, kv, pe)]
    got = kernels(npu).mla_attention(*[z.to(npu.device) for z in args], 0.1, None if mask is None else mask.to(npu.device))
    assert got.shape == (B, s, heads, C)
    close(got, REF.mla_attention(*[z.double() for z in args], 0.1, mask), 2e-2, f"mla heads={heads} S={s}")


@pytest.mark.parametrize("params", [V3_GATE, GateParams(2, 1, 1, "softmax", "none", False, 1.0),
                                    GateParams(3, 4, 2, "sigmoid", "top2_sum", False, 1.0)],  # last: reference fallback
                         ids=["v3", "softmax", "sigmoid-no-renorm"])
def test_moe_gate(npu, params):
    E = 32 if params.n_group == 8 else 16
    x, w = torch.randn(7, 64, generator=gen(12)), torch.randn(E, 64, generator=gen(13))
    bias = torch.randn(E, generator=gen(14)) * 0.3 if params.group_score == "top2_sum" else None
    d = npu.device
    wt, ids = kernels(npu).moe_gate(x.to(d), w.to(d), None if bias is None else bias.to(d), params)
    rw, rids = REF.moe_gate(x, w, bias, params)
    assert ids.dtype == torch.int64
    got = torch.zeros(7, E).scatter(1, ids.cpu(), wt.cpu())  # compare as dense maps: order within top-k is free
    ref = torch.zeros(7, E).scatter(1, rids, rw)
    close(got, ref, 1e-5, f"gate {params}")


@pytest.mark.parametrize("tokens,first", [(1, 0), (9, 0), (9, 8)])
def test_moe_experts(npu, tokens, first):
    E, D, I, k = 8, 64, 40, 3
    g = gen(tokens + first)
    x = torch.randn(tokens, D, generator=g).bfloat16()
    total = E if first == 0 else 2 * E
    ids = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(tokens)])
    wts = torch.rand(tokens, k, generator=g)
    ws = [torch.randn(E, *shape, generator=g).bfloat16() * 0.1 for shape in ((I, D), (D, I), (I, D))]
    ew = ExpertWeights(*[w.to(npu.device) for w in ws], first=first)
    got = kernels(npu).moe_experts(x.to(npu.device), wts.to(npu.device), ids.to(npu.device), ew)
    ref = REF.moe_experts(x.double(), wts.double(), ids, ExpertWeights(*[w.double() for w in ws], first=first))
    close(got, ref, 2e-2, f"experts T={tokens} first={first}")


# ---- the whole model ------------------------------------------------------------------------------
MODEL_CONFIGS = {**CONFIGS, "rope64": ALIGNED}  # ALIGNED has the 64-dim rope that takes npu_interleave_rope
# npu_moe_gating_top_k needs more than 2 experts per group: these tiny configs have exactly 2
EXPECTED_FALLBACKS = {"v3ish": {"moe_gate"}, "noqlora": set(), "blocks": {"moe_gate"}, "rope64": {"moe_gate"}}


@pytest.fixture(scope="module")
def checkpoints(tiny_ckpts, hf_refs, tmp_path_factory):
    ckpts, refs = dict(tiny_ckpts), dict(hf_refs)
    ckpts["rope64"] = write_checkpoint(tmp_path_factory.mktemp("rope64"), ALIGNED, seed=7, n_shards=2)
    refs["rope64"] = write_hf_reference(ckpts["rope64"], tmp_path_factory.mktemp("rope64_ref"))
    return ckpts, refs


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_model_no_worse_than_transformers_bf16(npu_module, name, checkpoints):
    ckpts, refs = checkpoints
    toks = torch.randint(0, MODEL_CONFIGS[name]["vocab_size"], (4, 64), generator=gen(1))  # 256 positions
    ref = hf_logits(hf_model(refs[name], torch.float32), toks)
    peer = hf_logits(hf_model(refs[name], torch.bfloat16), toks)
    engine = dsv3.load(ckpts[name], backend="ascend", device=npu_module.device, dtype="bf16")
    ours = engine.logits(toks).cpu()
    assert engine.kernels.fallbacks == EXPECTED_FALLBACKS[name]
    assert_no_worse(ours, peer, ref, f"ascend/{name}")


def test_generation_path(npu_module, demo_ckpt):
    """Decode (absorbed form over the latent cache, fused attention with one KV head) picks the argmax of
    a cache-free forward; a left-padded batch (BSND with a full mask) matches each prompt alone."""
    assert_generation_path(dsv3.load(demo_ckpt, backend="ascend", device=npu_module.device, dtype="bf16"), 4)
