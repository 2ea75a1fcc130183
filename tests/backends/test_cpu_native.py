"""The cpu backend's native kernels (native.c) against float64 formulas, the plain-torch ops, and in the model.

Shapes include batch 1, dims that are not multiples of 8, 32 or 128 (the vector loops' tails) and long caches.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from judge import assert_no_worse

import dsv3
from dsv3.backends.cpu import CpuKernels
from dsv3.backends.cpu import native as native_lib
from dsv3.core.kernels import GateParams
from dsv3.core.model import LatentCache

NATIVE = native_lib.load()
pytestmark = pytest.mark.skipif(NATIVE is None, reason="no C compiler here: the cpu backend runs plain torch")
BF16 = 2.0 ** -8  # one rounding to bf16, relative


def bf16(*shape, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def check(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    err = (got.double() - ref).abs().max().item()
    bound = rel * max(ref.abs().max().item(), 1e-30)
    assert not got.isnan().any() and err <= bound, f"{what}: max err {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 7, 5), (1, 512, 1024), (3, 200, 300), (15, 129, 1029)])
def test_linear_bf16(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x, w = bf16(M, K, g=g), bf16(N, K, g=g)
    ref = x.double() @ w.double().T
    got = NATIVE.linear_bf16(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # one rounding of the fp32 sum: within half a bf16 ulp of each value, plus fp32 summation order
    err = ((got.double() - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max().item()
    assert err <= BF16, f"linear {M}x{N}x{K}: max relative err {err:.3e}"


def swiglu64(x, w1, w3, w2):
    h = x @ w1.T
    return (h * torch.sigmoid(h) * (x @ w3.T)) @ w2.T


@pytest.mark.parametrize("D,I,ids", [(64, 33, [3, 0, 3]), (300, 128, [1]), (1024, 256, [4, 2, 0, 1]), (7, 5, [])])
def test_moe_bf16(D, I, ids):
    g = torch.Generator().manual_seed(D + I)
    E = 5
    x = bf16(D, g=g)
    w1, w3, w2 = bf16(E, I, D, g=g, scale=D ** -0.5), bf16(E, I, D, g=g, scale=D ** -0.5), bf16(E, D, I, g=g, scale=I ** -0.5)
    alpha = torch.rand(len(ids), generator=g)
    ref = torch.zeros(D, dtype=torch.float64)
    for a, e in zip(alpha.tolist(), ids):
        ref += a * swiglu64(x.double(), w1[e].double(), w3[e].double(), w2[e].double())
    y = NATIVE.moe_bf16(x[None], torch.tensor([ids], dtype=torch.int64).view(1, -1), alpha[None], w1, w3, w2)[0]
    if not ids:
        assert (y == 0).all()
        return
    check(y, ref, 4 * BF16, f"moe D={D} I={I} ids={ids}")


def test_moe_bf16_tokens_and_other_ranks_experts():
    """Two tokens on a rank holding global experts 2..4: ids outside that range are skipped, not clamped."""
    g = torch.Generator().manual_seed(9)
    D, I, first = 40, 24, 2
    x = bf16(2, D, g=g)
    w1, w3, w2 = bf16(3, I, D, g=g), bf16(3, I, D, g=g), bf16(3, D, I, g=g)
    ids = torch.tensor([[0, 3, 5], [2, 4, 1]])
    alpha = torch.rand(2, 3, generator=g)
    ref = torch.zeros(2, D, dtype=torch.float64)
    for t in range(2):
        for j in range(3):
            e = int(ids[t, j]) - first
            if 0 <= e < 3:
                ref[t] += alpha[t, j].item() * swiglu64(x[t].double(), w1[e].double(), w3[e].double(), w2[e].double())
    check(NATIVE.moe_bf16(x, ids, alpha, w1, w3, w2, first), ref, 4 * BF16, "moe, expert parallel")


@pytest.mark.parametrize("rows,D", [(1, 7), (3, 1024), (2, 1025)])
def test_rms_norm_bf16(rows, D):
    g = torch.Generator().manual_seed(D)
    x, w = bf16(rows, D, g=g), bf16(D, g=g)
    xd = x.double()
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()
    check(NATIVE.rms_norm_bf16(x, w, 1e-6), ref, 2 * BF16, f"rms_norm {rows}x{D}")


@pytest.mark.parametrize("B,S,H,D", [(1, 1, 1, 2), (1, 1, 8, 64), (2, 3, 3, 30)])
def test_rope_bf16_on_a_strided_view(B, S, H, D):
    g = torch.Generator().manual_seed(D)
    q = bf16(B, S, H, 11 + D, g=g)  # the rope part of a wider projection, as the model passes it
    x = q[..., 11:]
    ang = torch.rand(B, S, D // 2, generator=g) * 20
    got = NATIVE.rope_bf16(x, ang.cos(), ang.sin())
    z = torch.view_as_complex(x.double().reshape(B, S, H, D // 2, 2).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(ang.double()), ang.double())[:, :, None]).flatten(-2)
    check(got, ref, 2 * BF16, f"rope {B}x{S}x{H}x{D}")


GATES = [  # (E, n_group, topk_group, top_k, scoring, group_score, norm)
    (32, 4, 2, 4, "sigmoid", "top2_sum", True),
    (12, 3, 1, 3, "sigmoid", "top2_sum", True),
    (16, 8, 3, 4, "softmax", "max", False),
    (10, 1, 1, 2, "softmax", "none", True),
    (8, 4, 4, 1, "sigmoid", "top2_sum", False),
]


@pytest.mark.parametrize("E,n_group,topk_group,top_k,scoring,group_score,norm", GATES)
def test_moe_gate_matches_the_plain_torch_gate(E, n_group, topk_group, top_k, scoring, group_score, norm):
    g = torch.Generator().manual_seed(E * 7 + top_k)
    p = GateParams(top_k, n_group, topk_group, scoring, group_score, norm, 2.5)
    plain = CpuKernels()
    plain.native = None
    native = CpuKernels()
    for T in (1, 3):
        x = torch.randn(T, 65, generator=g).bfloat16()
        w = torch.randn(E, 65, generator=g)
        bias = torch.randn(E, generator=g) - 1.0  # negative biases: dropped groups must not win with 0
        for b in (bias, None):
            wn, idn = native.moe_gate(x, w, b, p)
            wp, idp = plain.moe_gate(x, w, b, p)
            assert idn.tolist() == idp.tolist(), f"ids {idn.tolist()} != plain torch {idp.tolist()}"
            check(wn, wp.double(), 1e-5, "gate weights")


@pytest.mark.parametrize("B,H,N,C,R,V,T", [(1, 1, 5, 20, 4, 7, 1), (1, 8, 64, 256, 64, 128, 37), (2, 3, 24, 72, 8, 40, 1000)])
def test_mla_absorbed_decode(B, H, N, C, R, V, T):
    g = torch.Generator().manual_seed(T + C)
    q = bf16(B, 1, H, N + R, g=g)
    q_nope, q_pe = q[..., :N], q[..., N:].contiguous()
    w_uk, w_uv = torch.randn(H, N, C, generator=g) * N ** -0.5, torch.randn(H, C, V, generator=g) * C ** -0.5
    kv_cache, pe_cache = bf16(B, T + 9, C, g=g), bf16(B, T + 9, R, g=g)  # read in place: batch stride > T rows
    kv, pe = kv_cache[:, :T], pe_cache[:, :T]
    scale = 0.3
    ql = torch.einsum("bshn,hnc->bshc", q_nope.double(), w_uk.double())
    s = (torch.einsum("bshc,btc->bsht", ql, kv.double()) + torch.einsum("bshr,btr->bsht", q_pe.double(), pe.double())) * scale
    o = torch.einsum("bsht,btc->bshc", s.softmax(-1), kv.double())
    ref = torch.einsum("bshc,hcv->bshv", o, w_uv.double())
    got = CpuKernels().mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale, None)
    assert got.shape == (B, 1, H, V) and got.dtype == torch.bfloat16
    check(got, ref, 4 * BF16, f"mla_absorbed B={B} H={H} T={T}")


def decode_logits(engine, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest one by one through the cache; the decode steps' logits."""
    m = engine.model
    cache = LatentCache.allocate(m.cfg, len(m.layers), tokens.shape[0], tokens.shape[1], engine.dtype, "cpu")
    m(tokens[:, :prefill], 0, cache)
    return torch.cat([m(tokens[:, i:i + 1], i, cache) for i in range(prefill, tokens.shape[1])], dim=1)


def test_bf16_decode_no_worse_than_plain_torch(tiny_ckpts):
    """Every decode op of the model through native.c (batch 1 and 4), judged against fp32 like the plain path.

    Pooled over the three configs and both batches: on tiny random models a bf16 difference in one
    value flips a near-tied routing choice and moves one config's error either way by up to ~1.7x
    (measured with the native rms_norm alone, which differs from F.rms_norm in 1e-4 of its outputs);
    1920 decode positions together judge the arithmetic rather than those flips.
    """
    got, peer, want = [], [], []
    for name in ("v3ish", "noqlora", "blocks"):
        ours = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="bf16")
        plain = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="bf16")
        plain.kernels.native = None
        ref = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="fp32")
        assert ours.kernels.native is not None
        tokens = torch.randint(0, ours.cfg.vocab_size, (4, 136), generator=torch.Generator().manual_seed(3))
        for batch in (tokens[:1], tokens):
            for out, engine in ((got, ours), (peer, plain), (want, ref)):
                out.append(decode_logits(engine, batch, 8).flatten(0, 1))  # [positions, V]
    vocab = min(t.shape[-1] for t in want)  # vocabularies differ: judge the logits of the ids all three have
    pooled = [torch.cat([t[:, :vocab] for t in ts]) for ts in (got, peer, want)]
    assert_no_worse(*pooled, "native decode, 3 configs x batch 1 and 4")


def test_fallbacks(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DSV3_CPU_NATIVE", "0")
    assert native_lib.load.__wrapped__() is None
    monkeypatch.setenv("DSV3_CPU_NATIVE", "1")
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger="dsv3"):
        assert native_lib.load.__wrapped__() is None
    assert "native kernels unavailable" in caplog.text
    monkeypatch.delenv("CC")
    built = native_lib.load.__wrapped__()
    assert built is not None and built.path.parent == tmp_path / "cache"
    plain = CpuKernels()
    plain.native = None
    x, w = torch.randn(1, 40).bfloat16(), torch.randn(24, 40).bfloat16()
    assert torch.equal(plain.linear(x, w), F.linear(x, w))  # without native.c, the plain-torch op


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (128, 128), (576, 384), (528, 200), (100, 448), (257, 1029)])
def test_dequant_fp8_same_bits_as_the_formula(fp8, dtype, N, K):
    """Every byte value (incl. subnormals and ±0) times block scales spanning 2^-20..2^4, the fp32 product
    rounded once: bit-identical to the float64-checked plain-torch dequantize, and to the product itself."""
    from dsv3.core.fp8 import dequantize, expand_scale, scale_shape

    g = torch.Generator().manual_seed(N * 1000 + K)
    nan = (0x80,) if fp8 == torch.float8_e4m3fnuz else (0x7F, 0xFF)
    raw = torch.randint(0, 256, (N, K), generator=g, dtype=torch.uint8)
    for b in nan:
        raw[raw == b] = 0x01
    w = raw.view(fp8)
    scale = torch.exp2(torch.randint(-20, 5, scale_shape((N, K)), generator=g).float()) * (
        1 + torch.rand(scale_shape((N, K)), generator=g))
    got = NATIVE.dequant_fp8(w, scale, dtype)
    exact = w.double() * expand_scale(scale.double(), N, K)  # the fp32 product is exact in float64
    assert torch.equal(got, exact.float().to(dtype)), "not the fp32 product rounded once"
    assert torch.equal(got, dequantize(w, scale, dtype))
