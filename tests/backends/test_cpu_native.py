"""The cpu backend's native kernels (csrc/) against float64 formulas, the plain-torch ops, and in the model.

Shapes include batch 1, dims that are not multiples of 8, 32 or 128 (the vector loops' tails and FP8 scale
blocks) and long caches. Every kernel runs on each instruction-set build this CPU can run (avx512, avx2,
generic), so an AVX-512 machine tests the AVX2 path too; bf16 and FP8 (e4m3fn and e4m3fnuz) weights.
"""

from __future__ import annotations

import ctypes
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from judge import assert_no_worse

import dsv3
from dsv3.backends.cpu import CpuKernels
from dsv3.backends.cpu import native as native_lib
from dsv3.core.fp8 import expand_scale, scale_shape
from dsv3.core.kernels import GateParams
from dsv3.core.model import LatentCache

NATIVE = native_lib.load()
pytestmark = pytest.mark.skipif(NATIVE is None, reason="no C compiler here: the cpu backend runs plain torch")
BF16 = 2.0 ** -8  # one rounding to bf16, relative
FP8 = [pytest.param(torch.float8_e4m3fn, id="e4m3fn"), pytest.param(torch.float8_e4m3fnuz, id="e4m3fnuz")]
WEIGHTS = [pytest.param("bf16", id="bf16"), *FP8]


def _isa_params():
    have = native_lib.supported_isas() if NATIVE is not None else []
    return [pytest.param(isa, id=isa, marks=() if isa in have else pytest.mark.skip(reason=f"this CPU lacks {isa}"))
            for isa in native_lib.ISAS]


ISAS = _isa_params()


@pytest.fixture(params=ISAS)
def lib(request):
    """The build for one instruction set, run on 3 threads: an odd count splits every kernel's work unevenly, whatever
    the machine's cores or the threads each test worker gets (conftest.py)."""
    built = native_lib.load(request.param)
    assert built is not None and built.isa == request.param, f"the {request.param} build reports {built and built.isa}"
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield built
    torch.set_num_threads(threads)


def bf16(*shape, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def check(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    err = (got.double() - ref).abs().max().item()
    bound = rel * max(ref.abs().max().item(), 1e-30)
    assert not got.isnan().any() and err <= bound, f"{what}: max err {err:.3e} > {bound:.3e}"


def fp8_weight(shape, fp8, g):
    """Random FP8 bytes (every value but the NaN codes: subnormals, ±0, the extremes), a stack or not, with block
    scales spanning 2^-12..2^-4 so every 128x128 block has its own. Returns (weight, scale, float64 value)."""
    raw = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    for b in torch.nonzero(torch.arange(256, dtype=torch.uint8).view(fp8).float().isnan()).flatten().tolist():
        raw[raw == b] = 0x01
    w = raw.view(fp8)
    *lead, rows, cols = shape
    sshape = (*lead, *scale_shape((rows, cols)))
    scale = torch.exp2(torch.randint(-12, -4, sshape, generator=g).float()) * (1 + torch.rand(sshape, generator=g))
    blocks = scale.double().reshape(-1, *sshape[-2:])
    value = w.double().reshape(-1, rows, cols) * torch.stack([expand_scale(b, rows, cols) for b in blocks])
    return w, scale, value.reshape(shape)


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 7, 5), (1, 512, 1024), (3, 200, 300), (4, 65, 160), (5, 33, 290),
                                   (15, 129, 1029)])
def test_linear_bf16(lib, M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x, w, r = bf16(M, K, g=g), bf16(N, K, g=g), bf16(M, N, g=g)
    ref = x.double() @ w.double().T
    got = lib.linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # one rounding of the fp32 sum: within half a bf16 ulp of each value, plus fp32 summation order
    err = ((got.double() - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max().item()
    assert err <= BF16, f"linear {M}x{N}x{K}: max relative err {err:.3e}"
    check(lib.linear(x, w, residual=r), ref + r.double(), 2 * BF16, f"linear + residual {M}x{N}x{K}")


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 7, 5), (1, 300, 1024), (2, 129, 130), (3, 200, 300),
                                   (4, 65, 160), (5, 33, 290), (15, 257, 1029)])
def test_linear_fp8(lib, fp8, M, N, K):
    """FP8 weights widened in registers, one fp32 scale per 128x128 block (K and N not multiples of 16 or 128); up to
    four rows share one pass over a weight row (M = 2, 3, 4, then 5 = 4 + 1 and 15 = 4 + 4 + 4 + 3)."""
    g = torch.Generator().manual_seed(M * N + K + 1)
    x, r = bf16(M, K, g=g), bf16(M, N, g=g)
    w, scale, value = fp8_weight((N, K), fp8, g)
    ref = x.double() @ value.T
    got = lib.linear(x, w, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    err = ((got.double() - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max().item()
    assert err <= BF16, f"fp8 linear {M}x{N}x{K}: max relative err {err:.3e}"
    check(lib.linear(x, w, scale, residual=r), ref + r.double(), 2 * BF16, f"fp8 linear + residual {M}x{N}x{K}")


@pytest.mark.parametrize("fp8", FP8)
# K = 100: the vector loops (first lane, later ones: 0..95 in 32s, or a whole 64 and a masked 36 with AVX512-BF16)
# and the scalar tail (96..99); col -1 is the last column
@pytest.mark.parametrize("col", [0, 21, 35, 70, 99, -1])
# one row (dot_fp8); several (dot_rows, or AVX512-BF16's masked tails); with AVX512-VBMI, 1-4 rows widen by table
# and 6 through fp16 (a long K too: blocks past the first, a masked tail of 56)
@pytest.mark.parametrize("rows,K", [(1, 100), (3, 100), (6, 100), (6, 3000)])
def test_fp8_every_byte_value(lib, fp8, col, rows, K):
    """Each of the 256 byte values (NaN codes aside), alone in its row against a one-hot x: exactly its value."""
    table = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    codes = torch.nonzero(~table.isnan()).flatten()
    raw = torch.zeros(len(codes), K, dtype=torch.uint8)
    raw[:, col] = codes.to(torch.uint8)
    x = torch.zeros(rows, K, dtype=torch.bfloat16)
    x[:, col] = 1.0
    got = lib.linear(x, raw.view(fp8), torch.ones(scale_shape(raw.shape))).float()
    for r in range(rows):
        wrong = got[r] != table[codes]
        assert not wrong.any(), f"FP8 bytes widen to wrong values in row {r} of {rows}, K = {K}: {got[r][wrong][:4]}"


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("K", [100, 1029])
def test_a_rows_sums_do_not_depend_on_its_company(lib, weights, K):
    """Row 0's linear and experts give the same bits alone and among 2-9 rows, or a prompt's tokens would depend on
    its batch: with AVX512-BF16 the table widens FP8 for 1-4 rows and the conversion through fp16 for 5-8 (9 = 8 + 1);
    without, rows go four a pass, a lone row too (its own loop summed bf16 weights in another order)."""
    g = torch.Generator().manual_seed(K)
    N, I, E = 70, 130, 4
    x = bf16(9, K, g=g)
    if weights == "bf16":
        w, s = bf16(N, K, g=g), None
    else:
        w, s, _ = fp8_weight((N, K), weights, g)
    w1, w3, w2, s1, s3, s2, *_ = experts(E, I, K, g, weights)
    ids, alpha = torch.tensor([[1, 3]] * 9), torch.rand(9, 2, generator=g)
    alone = lib.linear(x[:1], w, s), lib.moe(x[:1], ids[:1], alpha[:1], w1, w3, w2, s1, s3, s2)
    for M in range(2, 10):
        among = lib.linear(x[:M], w, s)[:1], lib.moe(x[:M], ids[:M], alpha[:M], w1, w3, w2, s1, s3, s2)[:1]
        for what, a, b in zip(("linear", "experts"), alone, among):
            assert torch.equal(a, b), f"{what}: row 0 among {M} rows differs from row 0 alone by {(a - b).abs().max()}"


def swiglu64(x, w1, w3, w2):
    h = x @ w1.T
    return (h * torch.sigmoid(h) * (x @ w3.T)) @ w2.T


def experts(E, I, D, g, weights):
    """(w1, w3, w2, s1, s3, s2, float64 values of w1, w3, w2): bf16, or FP8 with block scales."""
    if weights == "bf16":
        w1, w3, w2 = bf16(E, I, D, g=g, scale=D ** -0.5), bf16(E, I, D, g=g, scale=D ** -0.5), bf16(E, D, I, g=g,
                                                                                                  scale=I ** -0.5)
        return w1, w3, w2, None, None, None, w1.double(), w3.double(), w2.double()
    (w1, s1, v1), (w3, s3, v3), (w2, s2, v2) = (fp8_weight(sh, weights, g) for sh in ((E, I, D), (E, I, D), (E, D, I)))
    return w1, w3, w2, s1, s3, s2, v1, v3, v2


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("D,I,ids", [(64, 33, [[3, 0, 3]]), (300, 129, [[1]]), (1024, 256, [[4, 2, 0, 1]]),
                                     (7, 5, [[]]), (200, 140, [[1, 2], [2, 0], [1, 4]]),
                                     (96, 130, [[1, 0], [1, 2], [1, 0], [1, 3], [1, 0], [1, 4]])])
def test_moe(lib, weights, D, I, ids):
    """Routed SwiGLU experts of one or a few tokens (a token may name an expert twice; tokens share experts; six
    tokens on one expert: its weight rows serve four rows per pass, then two)."""
    g = torch.Generator().manual_seed(D + I)
    E, T = 5, len(ids)
    x = bf16(T, D, g=g)
    w1, w3, w2, s1, s3, s2, v1, v3, v2 = experts(E, I, D, g, weights)
    ids = torch.tensor(ids, dtype=torch.int64).view(T, -1)
    alpha = torch.rand(*ids.shape, generator=g)
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for a, e in zip(alpha[t].tolist(), ids[t].tolist()):
            ref[t] += a * swiglu64(x[t].double(), v1[e], v3[e], v2[e])
    y = lib.moe(x, ids, alpha, w1, w3, w2, s1, s3, s2)
    if not ids.numel():
        assert (y == 0).all()
        return
    check(y, ref, 4 * BF16, f"moe {weights} D={D} I={I} ids={ids.tolist()}")
    r = bf16(T, D, g=g)
    check(lib.moe(x, ids, alpha, w1, w3, w2, s1, s3, s2, residual=r), ref + r.double(), 4 * BF16, "moe + residual")


@pytest.mark.parametrize("weights", WEIGHTS)
def test_moe_tokens_and_other_ranks_experts(lib, weights):
    """Two tokens on a rank holding global experts 2..4: ids outside that range are skipped, not clamped."""
    g = torch.Generator().manual_seed(9)
    D, I, first = 40, 24, 2
    x = bf16(2, D, g=g)
    w1, w3, w2, s1, s3, s2, v1, v3, v2 = experts(3, I, D, g, weights)
    ids = torch.tensor([[0, 3, 5], [2, 4, 1]])
    alpha = torch.rand(2, 3, generator=g)
    ref = torch.zeros(2, D, dtype=torch.float64)
    for t in range(2):
        for j in range(3):
            e = int(ids[t, j]) - first
            if 0 <= e < 3:
                ref[t] += alpha[t, j].item() * swiglu64(x[t].double(), v1[e], v3[e], v2[e])
    check(lib.moe(x, ids, alpha, w1, w3, w2, s1, s3, s2, first), ref, 4 * BF16, "moe, expert parallel")


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (129, 300), (257, 1029)])
def test_fp8_to_bf16_same_bits_as_dequantize(lib, fp8, N, K):
    """The prefill widening (vector registers, no table) gives dequantize's bits: the fp32 product rounded once."""
    from dsv3.core.fp8 import dequantize

    w, scale, _ = fp8_weight((N, K), fp8, torch.Generator().manual_seed(N + K))
    assert torch.equal(lib.fp8_to_bf16(w, scale), dequantize(w, scale, torch.bfloat16))


@pytest.mark.parametrize("fp8", FP8)
def test_count_nan(lib, fp8):
    raw = torch.full((300, 7), 0x11, dtype=torch.uint8)
    codes = torch.nonzero(torch.arange(256, dtype=torch.uint8).view(fp8).float().isnan()).flatten().tolist()
    for i, c in enumerate(codes * 3):
        raw[i * 50, i] = c
    assert lib.count_nan(raw.view(fp8)) == 3 * len(codes)
    assert lib.count_nan(torch.full((5,), 0x11, dtype=torch.uint8).view(fp8)) == 0


@pytest.mark.parametrize("rows,D", [(1, 7), (3, 1024), (2, 1025), (40, 300)])
def test_rms_norm_bf16(lib, rows, D):
    g = torch.Generator().manual_seed(D)
    x, w = bf16(rows, D, g=g), bf16(D, g=g)
    xd = x.double()
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()
    check(lib.rms_norm_bf16(x, w, 1e-6), ref, 2 * BF16, f"rms_norm {rows}x{D}")


@pytest.mark.parametrize("B,S,H,D", [(1, 1, 1, 2), (1, 1, 8, 64), (2, 3, 3, 30)])
def test_rope_bf16_on_a_strided_view(lib, B, S, H, D):
    g = torch.Generator().manual_seed(D)
    q = bf16(B, S, H, 11 + D, g=g)  # the rope part of a wider projection, as the model passes it
    x = q[..., 11:]
    ang = torch.rand(B, S, D // 2, generator=g) * 20
    got = lib.rope_bf16(x, ang.cos(), ang.sin())
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
def test_moe_gate_matches_the_plain_torch_gate(lib, E, n_group, topk_group, top_k, scoring, group_score, norm):
    g = torch.Generator().manual_seed(E * 7 + top_k)
    p = GateParams(top_k, n_group, topk_group, scoring, group_score, norm, 2.5)
    plain = CpuKernels()
    plain.native = None
    native = CpuKernels()
    native.native = lib
    for T in (1, 3, 40):  # 40: a prompt's rows (the logits from torch's GEMM, the selection in C)
        x = torch.randn(T, 65, generator=g).bfloat16()
        w = torch.randn(E, 65, generator=g)
        bias = torch.randn(E, generator=g) - 1.0  # negative biases: dropped groups must not win with 0
        for b in (bias, None):
            wn, idn = native.moe_gate(x, w, b, p)
            wp, idp = plain.moe_gate(x, w, b, p)
            # the same experts; their order may differ where two choices tie to an ulp of the sigmoid (saturated)
            assert idn.sort(-1).values.tolist() == idp.sort(-1).values.tolist(), f"ids {idn.tolist()} != plain torch {idp.tolist()}"
            check(wn.gather(1, idn.argsort(-1)), wp.gather(1, idp.argsort(-1)).double(), 1e-5, "gate weights")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.3, 40.0])  # 40: scores hundreds apart, e^x overflows unless the max is right
@pytest.mark.parametrize("B,H,N,C,R,V,T", [(1, 1, 5, 20, 4, 7, 1), (1, 8, 64, 256, 64, 128, 37), (2, 3, 24, 72, 8, 40, 1000),
                                           (1, 2, 128, 512, 64, 128, 300),
                                           # long contexts: chunks of keys merged (1025: a chunk of one key), head
                                           # groups not a multiple of 4, V3's dims
                                           (2, 7, 24, 72, 8, 40, 1025), (1, 5, 16, 72, 8, 40, 2500),
                                           (1, 16, 128, 512, 64, 128, 3000)])
def test_mla_absorbed_decode(lib, wdtype, scale, B, H, N, C, R, V, T):
    g = torch.Generator().manual_seed(T + C)
    q = bf16(B, 1, H, N + R, g=g)
    q_nope, q_pe = q[..., :N], q[..., N:].contiguous()
    w_uk, w_uv = torch.randn(H, N, C, generator=g) * N ** -0.5, torch.randn(H, C, V, generator=g) * C ** -0.5
    w_uk, w_uv = w_uk.to(wdtype), w_uv.to(wdtype)  # the absorbed projections: fp32 on CPUs slow in bf16, else bf16
    kv_cache, pe_cache = bf16(B, T + 9, C, g=g), bf16(B, T + 9, R, g=g)  # read in place: batch stride > T rows
    kv, pe = kv_cache[:, :T], pe_cache[:, :T]
    ql = torch.einsum("bshn,hnc->bshc", q_nope.double(), w_uk.double())
    s = (torch.einsum("bshc,btc->bsht", ql, kv.double()) + torch.einsum("bshr,btr->bsht", q_pe.double(), pe.double())) * scale
    o = torch.einsum("bsht,btc->bshc", s.softmax(-1), kv.double())
    ref = torch.einsum("bshc,hcv->bshv", o, w_uv.double())
    k = CpuKernels()
    k.native = lib
    got = k.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale, None)
    assert got.shape == (B, 1, H, V) and got.dtype == torch.bfloat16
    check(got, ref, 4 * BF16, f"mla_absorbed B={B} H={H} T={T}")


def test_softmax_exp_is_accurate(lib):
    """The kernels' e^x (common.h v_exp with AVX-512 or AVX2: the attention's softmax, the AMX SiLU; expf elsewhere)
    within 2.5e-7 relative of float64 (about 2 fp32 ulps) over [-87, 88]; below -87 the vector one gives 0, so
    the -inf padding of a score tile adds nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-87, 88, 350001), -torch.rand(100000, generator=g) * 20,
                   torch.tensor([0.0, -1e-30, -1e-7, 1e-7, -0.34657359, -0.34657360, 0.34657360, -86.99, 88.3])])
    want = x.double().exp()
    rel = ((lib.softmax_exp(x).double() - want).abs() / want).max().item()
    assert rel <= 2.5e-7, f"e^x: max relative error {rel:.3e} > 2.5e-7"
    if lib.isa != "generic":
        low = lib.softmax_exp(torch.tensor([-87.01, -100.0, -float("inf")]))
        assert low.tolist() == [0.0, 0.0, 0.0], f"e^x below -87: {low.tolist()}, want 0"


@pytest.mark.parametrize("share", ["in the items", "by head"])
def test_mla_absorbed_rows_do_not_depend_on_their_batch(lib, share):
    """Heads are grouped by how many items keep the threads busy (fewer per group for a lone row), a long context
    is split into chunks, and where the projections outgrow the cache a batch's queries share each head's (forced
    here: `dsv3_mla_share_bytes` 0), where a lone query projects its own: a row's result is bit for bit the same
    alone or in a batch, at every length."""
    g = torch.Generator().manual_seed(5)
    B, H, N, C, R, V, T = 3, 12, 32, 128, 16, 32, 2100
    q = bf16(B, 1, H, N + R, g=g)
    q_nope, q_pe = q[..., :N], q[..., N:].contiguous()
    w_uk = (torch.randn(H, N, C, generator=g) * N ** -0.5).bfloat16()
    w_uv = (torch.randn(H, C, V, generator=g) * C ** -0.5).bfloat16()
    kv, pe = bf16(B, T, C, g=g), bf16(B, T, R, g=g)
    limit = ctypes.c_int64.in_dll(lib.lib, "dsv3_mla_share_bytes")  # (the generic build reads it not)
    saved, limit.value = limit.value, 0 if share == "by head" else 1 << 40
    try:
        check_batch(lib, q_nope, q_pe, w_uk, w_uv, kv, pe)
    finally:
        limit.value = saved


def check_batch(lib, q_nope, q_pe, w_uk, w_uv, kv, pe):
    B = q_nope.shape[0]
    for lens in (None, torch.tensor([[2100], [1024], [7]]), torch.tensor([[900], [1024], [7]])):
        together = lib.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, 0.3, lens)
        for b in range(B):
            alone = lib.mla_absorbed(q_nope[b:b + 1], q_pe[b:b + 1], w_uk, w_uv, kv[b:b + 1], pe[b:b + 1], 0.3,
                                     None if lens is None else lens[b:b + 1].contiguous())
            assert torch.equal(alone, together[b:b + 1]), f"row {b} (lens {lens}) differs alone and in the batch"
        # a big batch at a long context goes in passes of a few rows (here one: the limit below one row's sums)
        limit = ctypes.c_int64.in_dll(lib.lib, "dsv3_mla_part_floats")
        saved, limit.value = limit.value, 1000
        try:
            passes = lib.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, 0.3, lens)
        finally:
            limit.value = saved
        assert torch.equal(passes, together), f"lens {lens}: a batch in passes differs from the batch in one"


def decode_logits(engine, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest one by one through the cache; the decode steps' logits."""
    m = engine.model
    cache = LatentCache.allocate(m.cfg, len(m.layers), tokens.shape[0], tokens.shape[1], engine.dtype, "cpu")
    m(tokens[:, :prefill], 0, cache)
    return torch.cat([m(tokens[:, i:i + 1], i, cache) for i in range(prefill, tokens.shape[1])], dim=1)


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_bf16_decode_no_worse_than_plain_torch(tiny_ckpts, weights):
    """Every decode op of the model through the C kernels (batch 1 and 4), judged against fp32 like the plain path;
    with the FP8 weights kept as FP8 (widened in the kernels) or dequantized to bf16 at load.

    Pooled over the three configs and both batches: on tiny random models a bf16 difference in one
    value flips a near-tied routing choice and moves one config's error either way by up to ~1.7x
    (measured with the native rms_norm alone, which differs from F.rms_norm in 1e-4 of its outputs);
    1920 decode positions together judge the arithmetic rather than those flips.
    """
    got, peer, want = [], [], []
    for name in ("v3ish", "noqlora", "blocks"):
        ours = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="bf16", cpu_weights=weights)
        plain = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="bf16", cpu_weights="bf16")
        plain.kernels.native = None
        assert (ours.kernels.fp8_dtype is not None) == (weights == "fp8")
        ref = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="fp32")
        assert ours.kernels.native is not None
        tokens = torch.randint(0, ours.cfg.vocab_size, (4, 136), generator=torch.Generator().manual_seed(3))
        for batch in (tokens[:1], tokens):
            for out, engine in ((got, ours), (peer, plain), (want, ref)):
                out.append(decode_logits(engine, batch, 8).flatten(0, 1))  # [positions, V]
    vocab = min(t.shape[-1] for t in want)  # vocabularies differ: judge the logits of the ids all three have
    pooled = [torch.cat([t[:, :vocab] for t in ts]) for ts in (got, peer, want)]
    assert_no_worse(*pooled, f"native decode ({weights} weights), 3 configs x batch 1 and 4")


def test_prefill_chunks_take_the_absorbed_kernel_where_cheaper(tiny_ckpts, monkeypatch):
    """A bf16 position step of more than 8 queries (a server's prefill chunk) runs the absorbed form in the C kernel
    up to the backend's crossing (absorb_max_queries; 40 at these dims), and its logits are no worse than the naive
    form's against fp32; a prompt's plain prefill (not a position step) keeps the naive form. An AMX build keeps
    the naive form for chunks (torch's GEMMs run on tiles there); the rule is checked on the avx512bf16 build."""
    ours = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="bf16")
    if ours.kernels.native is not None and ours.kernels.native.isa == "amx":
        c = ours.cfg
        assert ours.kernels.absorb_max_queries(True, torch.bfloat16, c.kv_lora_rank, c.qk_nope_head_dim,
                                               c.qk_rope_head_dim, c.v_head_dim) == 8
        monkeypatch.setenv("DSV3_CPU_ISA", "avx512bf16")
        ours = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="bf16")
        assert ours.kernels.native.isa == "avx512bf16"
    naive = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="bf16", attn_impl="naive")
    ref = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="fp32")
    cfg, lib = ours.cfg, ours.kernels.native
    dims = (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
    most = ours.kernels.absorb_max_queries(True, torch.bfloat16, *dims)
    assert 8 < most < 100, most
    # not a position step, fp32 (no C kernel for it): the default
    assert ours.kernels.absorb_max_queries(False, torch.bfloat16, *dims) == 8
    assert ours.kernels.absorb_max_queries(True, torch.float32, *dims) == 8
    chunk, seen = min(most, 32), []
    call = lib.mla_absorbed
    monkeypatch.setattr(lib, "mla_absorbed",
                        lambda q_nope, *a, **k: seen.append(q_nope.shape[1]) or call(q_nope, *a, **k))
    tokens = torch.randint(0, cfg.vocab_size, (2, 5 * chunk), generator=torch.Generator().manual_seed(4))
    logits = []
    for engine in (ours, naive, ref):
        m = engine.model
        cache = LatentCache.allocate(m.cfg, len(m.layers), 2, tokens.shape[1], engine.dtype, "cpu")
        with torch.inference_mode():
            logits.append(torch.cat([m.forward_step(tokens[:, s:s + chunk], torch.tensor([s, s]), cache, s + chunk)[0]
                                     for s in range(0, tokens.shape[1], chunk)], dim=1).flatten(0, 1).float())
        if engine is ours:
            assert seen and set(seen) == {chunk}, f"the chunks of {chunk} queries reached the C kernel as {set(seen)}"
            seen.clear()
            with torch.inference_mode():
                m(tokens[:, :chunk], 0, LatentCache.allocate(m.cfg, len(m.layers), 2, chunk, engine.dtype, "cpu"))
            assert not seen, "a plain prefill took the absorbed form"
    assert not seen, "the naive engine took the absorbed form"
    assert_no_worse(*logits, f"prefill in chunks of {chunk}, absorbed in C vs naive")


def test_fallbacks(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DSV3_CPU_NATIVE", "0")
    assert native_lib.load() is None
    monkeypatch.setenv("DSV3_CPU_NATIVE", "1")
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger="dsv3"):
        assert native_lib._load.__wrapped__("generic") is None
    assert "native kernels unavailable" in caplog.text
    monkeypatch.delenv("CC")
    built = native_lib._load.__wrapped__("generic")
    assert built is not None and built.path.parent == tmp_path / "cache" and built.isa == "generic"
    plain = CpuKernels()
    plain.native = None
    x, w = torch.randn(1, 40).bfloat16(), torch.randn(24, 40).bfloat16()
    assert torch.equal(plain.linear(x, w), F.linear(x, w))  # without the C kernels, the plain-torch op


def test_instruction_set_choice(monkeypatch, caplog):
    """The widest set the CPU runs by default; DSV3_CPU_ISA picks another, an unknown one is refused with the list."""
    have = native_lib.supported_isas()
    assert have[-1] == "generic" and native_lib.load().isa == have[0]
    monkeypatch.setenv("DSV3_CPU_ISA", "generic")
    assert native_lib.load().isa == "generic"
    monkeypatch.setenv("DSV3_CPU_ISA", "sse9")
    with caplog.at_level(logging.WARNING, logger="dsv3"):
        assert native_lib.load().isa == have[0]
    assert "DSV3_CPU_ISA=sse9" in caplog.text and have[0] in caplog.text
    with pytest.raises(ValueError, match="this CPU runs"):
        native_lib.load("sse9")


def test_optional_flags_follow_the_cpu(monkeypatch):
    """AVX512-VBMI (the FP8 table) joins the bf16 builds only, and only where the CPU has it; a build made here
    reports the table exactly when this CPU has VBMI, so the tests above ran the path this CPU takes."""
    base = native_lib.ISAS["avx512bf16"][0]
    monkeypatch.setattr(native_lib, "_cpu_flags", lambda: "flags : avx512f avx512vbmi")
    assert native_lib._flags("avx512bf16") == base + ["-mavx512vbmi"]
    assert native_lib._flags("avx512") == native_lib.ISAS["avx512"][0]
    monkeypatch.setattr(native_lib, "_cpu_flags", lambda: "flags : avx512f")
    assert native_lib._flags("avx512bf16") == base
    monkeypatch.undo()
    vbmi = "avx512vbmi" in native_lib._cpu_flags().split()
    for isa in native_lib.supported_isas():
        built = native_lib.load(isa)
        assert built.fp8_table == (vbmi and built.bf16dot), f"{isa}: fp8_table={built.fp8_table}, vbmi={vbmi}"


def test_a_compiler_without_an_optional_flag_keeps_the_build(tmp_path, monkeypatch):
    """A compiler that refuses -mavx512vbmi still gives the AVX512-BF16 build, without the FP8 table."""
    if "avx512bf16" not in native_lib.supported_isas():
        pytest.skip("this CPU lacks avx512bf16")
    real = native_lib._cpu_flags
    monkeypatch.setattr(native_lib, "_cpu_flags", lambda: real() + " avx512vbmi")
    cc = shutil.which("cc") or shutil.which("gcc")
    fussy = tmp_path / "fussy-cc"
    fussy.write_text(f'#!/bin/sh\ncase " $* " in *" -mavx512vbmi "*) echo "unknown flag" >&2; exit 1;; esac\n'
                     f'exec {cc} "$@"\n')
    fussy.chmod(0o755)
    monkeypatch.setenv("CC", str(fussy))
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path / "cache"))
    built = native_lib._load.__wrapped__("avx512bf16")
    assert built is not None and built.isa == "avx512bf16" and built.bf16dot and not built.fp8_table


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


def test_fp8_weights_stay_fp8_in_memory(tiny_ckpts):
    """FP8-resident mode holds the checkpoint's bytes (FP8 weights 1 byte each with their scales; bf16 embedding, head
    and norms as stored; the fp32 gate and the absorbed projections are the only extra), well under what bf16 holds."""
    from dsv3.core import names as N
    from dsv3.core.checkpoint import Checkpoint
    from dsv3.core.model import Linear, StackedLinear
    from dsv3.engine import resident_bytes

    path = tiny_ckpts["v3ish"]
    ckpt = Checkpoint(path)
    layers = dsv3.load(path, backend="cpu", dtype="bf16", cpu_weights="fp8")
    held_in_ckpt = sum(ckpt.info(n).nbytes for n in ckpt.names()
                       if N.demo_to_model(n[: -len("scale")] + "weight" if n.endswith(".scale") else n,
                                          layers.cfg.num_hidden_layers) is not None)
    ckpt.close()
    sizes, extra = {}, {}
    for weights in ("fp8", "bf16"):
        engine = dsv3.load(path, backend="cpu", dtype="bf16", cpu_weights=weights)
        engine.generate([[1, 2, 3]], max_new_tokens=2)  # makes the absorbed projections
        kept = [m.weight.dtype for m in engine.model.modules() if isinstance(m, (Linear, StackedLinear))
                and m.scale is not None]
        assert (set(kept) == {torch.float8_e4m3fn}) if weights == "fp8" else not kept, f"{weights}: {set(kept)}"
        absorbed = sum(t.numel() * t.element_size() for layer in engine.model.layers
                       for t in (layer.attn._absorbed or ()))
        # one dequantized copy of wkv_b per layer, in the backend's absorb dtype (fp32 where bf16 is slow: AVX2)
        width = torch.empty((), dtype=engine.kernels.absorb_dtype(torch.bfloat16)).element_size()
        assert absorbed == sum(layer.attn.wkv_b.weight.numel() * width for layer in engine.model.layers), absorbed
        sizes[weights], extra[weights] = resident_bytes(engine) + absorbed, absorbed
    gate = sum(layer.ffn.gate.weight.numel() * 2 for layer in engine.model.layers if hasattr(layer.ffn, "gate"))
    assert sizes["fp8"] - extra["fp8"] <= 1.05 * held_in_ckpt + gate, \
        f"{sizes['fp8'] - extra['fp8']} bytes held besides the absorbed projections, {held_in_ckpt} in the checkpoint"
    assert sizes["bf16"] > 1.3 * sizes["fp8"]


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_recorded_decode_step_gives_the_eager_tokens(tiny_ckpts, weights):
    """bf16 greedy on every tiny config, a lone prompt and a batch of 3 different lengths (padded into bucket 4): the
    recorded and replayed decode step (tape.py) gives the eager step's tokens, and the stats say it replayed."""
    prompts = [[5, 9, 200, 17, 3, 88, 41], [250, 2, 77], [12, 13]]
    for name in ("v3ish", "noqlora", "blocks"):
        engine = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="bf16", cpu_weights=weights)
        for batch in (prompts[:1], prompts):
            engine.cuda_graphs = False
            eager = engine.generate(batch, max_new_tokens=20)
            assert engine.last_stats.extra["decode_step"] == "eager"
            engine.cuda_graphs = True
            assert engine.generate(batch, max_new_tokens=20) == eager, f"{name}, {len(batch)} prompts"
            assert engine.last_stats.extra["decode_step"] == "graph"


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512"])
@pytest.mark.parametrize("batch", [6, 12])
def test_wide_decode_steps_are_recorded(tiny_ckpts, batch, isa, monkeypatch):
    """v3ish (every dim a multiple of 32), bf16, FP8 weights: on AMX a decode step of 6 prompts (bucket 8) runs its
    linears and MLPs on AMX tiles (linear_amx, mlp_amx), one of 12 (bucket 16: 32 routes over 8 experts) its routed
    experts too (moe_amx); without AMX, the C kernels. Either way nothing is read back on the host, so the step is
    recorded and replayed, and the replay gives the unrecorded static step's tokens."""
    if NATIVE is None or isa not in native_lib.supported_isas():
        pytest.skip(f"this CPU lacks {isa}")
    monkeypatch.setenv("DSV3_CPU_ISA", isa)
    engine = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="bf16", cpu_weights="fp8")
    native = engine.model.kernels.native
    assert native.isa == isa
    calls = {"linear_amx": 0, "mlp_amx": 0, "grouped_amx": 0, "moe_amx": 0}
    for name in calls:
        real = getattr(native, name)
        setattr(native, name, lambda *a, _real=real, _name=name, **kw: calls.__setitem__(_name, calls[_name] + 1)
                or _real(*a, **kw))
    prompts = [[5 + 7 * i + j for j in range(3 + i % 4)] for i in range(batch)]
    engine.cuda_graphs = False
    engine.generate(prompts, max_new_tokens=1, static=True)  # the prompt alone: its calls are not the steps'
    prompt = dict(calls)
    static = engine.generate(prompts, max_new_tokens=12, static=True)
    assert engine.last_stats.extra["decode_step"] == "static"
    steps = {name: calls[name] - 2 * prompt[name] for name in calls}
    if isa == "amx":
        assert steps["linear_amx"] > 0 and steps["mlp_amx"] > 0 and steps["grouped_amx"] == 0, steps
        assert (steps["moe_amx"] > 0) == (batch > 8), steps
    else:
        assert not any(steps.values()), steps
    engine.cuda_graphs = True
    assert engine.generate(prompts, max_new_tokens=12) == static, f"{batch} prompts"
    assert engine.last_stats.extra["decode_step"] == "graph"


def test_tape_replays_computes_views_in_place_ops_and_filled_tensors():
    """The recorder's rules on a made-up step: computing ops rerun into their first outputs, views alias, in-place
    ops rerun, zero-filled tensors are zeroed again, and a host read refuses the recording."""
    from dsv3.backends.cpu import tape as T

    x = torch.tensor([1.0, 2.0, 3.0])
    idx = torch.tensor([2, 0])

    def step():
        acc = torch.zeros(2)
        acc.add_(x[idx])  # a gather, then in place into a filled tensor
        y = (acc * 2).view(2, 1)  # compute, then a view
        NATIVE.lib.dsv3_isa()  # a query, not recorded
        return torch.cat([y, y + 1], dim=1).flatten()

    tape, out = T.record(step, NATIVE)
    assert out.tolist() == [6.0, 7.0, 2.0, 3.0]
    x.copy_(torch.tensor([10.0, 20.0, 30.0]))
    idx.copy_(torch.tensor([1, 1]))
    tape.replay()
    assert out.tolist() == [40.0, 41.0, 40.0, 41.0]
    tape.replay()  # the zero-filled accumulator starts from zero again
    assert out.tolist() == [40.0, 41.0, 40.0, 41.0]

    T.check(tape, out)  # replays reproduce the recording

    def reads_the_host():
        return x * 2 if bool((x > 0).all()) else x

    with pytest.raises(T.Uncapturable, match="__bool__"):
        T.record(reads_the_host, NATIVE)

    def data_dependent_shape():  # boolean indexing sizes its result by the data, behind torch's back
        return x[x > 15.0] * 2

    tape, out = T.record(data_dependent_shape, NATIVE)
    x.copy_(torch.tensor([10.0, 20.0, 30.0]))
    x[0] = 16.0  # three elements pass now: the recorded two-element result cannot hold them
    with pytest.raises(T.Uncapturable, match="replay failed"):
        T.check(tape, out)


def test_a_step_that_cannot_be_recorded_runs_eagerly(tiny_ckpts, monkeypatch, caplog):
    from dsv3.backends.cpu import tape as T

    engine = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="bf16")
    want = engine.generate([[3, 4, 5]], max_new_tokens=5)

    def refuse(fn, native):
        raise T.Uncapturable("a host read")

    monkeypatch.setattr(T, "record", refuse)
    engine.release()  # else the first call's recorded step, kept for this shape, replays
    with caplog.at_level(logging.INFO, logger="dsv3"):
        assert engine.generate([[3, 4, 5]], max_new_tokens=5) == want
    assert "cannot be recorded (a host read)" in caplog.text
    assert engine.last_stats.extra["decode_step"] == "static"


AMX = pytest.mark.skipif(NATIVE is None or "amx" not in native_lib.supported_isas(), reason="this CPU has no AMX tiles")


@AMX
@pytest.mark.parametrize("weights", ["bf16", *FP8])
@pytest.mark.parametrize("counts,N,K,G", [([1], 32, 32, 1), ([0, 17, 33, 5], 48, 160, 2), ([64, 0, 2], 64, 256, 1),
                                          ([40, 31], 16, 96, 2)])
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gathered"])
def test_grouped_amx(weights, counts, N, K, G, gather):
    """Each expert's rows times its weights on AMX tiles (G = 1), or the SwiGLU of two (G = 2: gate and up rounded to
    bf16, then silu, then the product, as separate bf16 ops): rows not a multiple of 16 or 32 (a tile runs past an
    expert's rows), experts with none, K not a multiple of 128 (FP8 scale blocks); rows read in place or gathered
    through an index."""
    lib = native_lib.load("amx")
    g = torch.Generator().manual_seed(sum(counts) + N + K + G)
    E, R = len(counts), sum(counts)
    starts = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    src = bf16(R + 7, K, g=g)
    rows = torch.randperm(R + 7, generator=g)[:R] if gather else None
    a = src[rows] if gather else src[:R]
    src = src if gather else src[:R].clone()  # exactly R rows: the kernel pads its tiles itself
    mats = []
    for _ in range(G):
        if weights == "bf16":
            w = bf16(E, N, K, g=g, scale=K ** -0.5)
            mats.append((w, None, w.double()))
        else:
            mats.append(fp8_weight((E, N, K), weights, g))
    got = lib.grouped_amx(src, starts, *[t for w, sc, _ in mats for t in (w, sc)], rows=rows)
    assert got is not None and got.shape == (R, N) and got.dtype == torch.bfloat16
    prods = [torch.cat([a[starts[e]:starts[e + 1]].double() @ v[e].T for e in range(E)]) for _, _, v in mats]
    if G == 1:
        ref, tol = prods[0], 2 * BF16  # weights rounded to bf16 inside (FP8 x scale), the output once
    else:
        rb = lambda t: t.bfloat16().double()  # noqa: E731
        gate, up = rb(prods[0]), rb(prods[1])
        ref, tol = rb(rb(gate * torch.sigmoid(gate)) * up), 6 * BF16  # a gate rounding apart moves silu and product
    check(got, ref, tol, f"grouped_amx {weights} counts={counts} N={N} K={K} G={G} gather={gather}")


@AMX
@pytest.mark.parametrize("weights", ["bf16", *FP8])
@pytest.mark.parametrize("T,k,E,first,D,I", [(1, 2, 4, 0, 32, 32), (5, 3, 6, 3, 96, 64), (40, 8, 8, 0, 64, 160)])
def test_moe_amx(weights, T, k, E, first, D, I):
    """The routed experts in one call on AMX tiles (routes sorted by expert in C, gate/up SwiGLU, down, weighted sum)
    against float64 with the reference's roundings: one token, other ranks' experts (ids below `first` and past its
    experts), an expert with no rows, K not a multiple of 128."""
    lib = native_lib.load("amx")
    g = torch.Generator().manual_seed(T * k + E + D)
    stacks = []
    for n, m in ((I, D), (I, D), (D, I)):
        if weights == "bf16":
            w = bf16(E, n, m, g=g, scale=m ** -0.5)
            stacks.append((w, None, w.double()))
        else:
            stacks.append(fp8_weight((E, n, m), weights, g))
    (w1, s1, v1), (w3, s3, v3), (w2, s2, v2) = stacks
    x = bf16(T, D, g=g)
    ids = torch.randint(0, E + first + 2, (T, k), generator=g)
    ids[ids == first + 1] = first  # expert 1 gets no rows
    alpha = torch.rand(T, k, generator=g)
    got = lib.moe_amx(x, ids, alpha, w1, w3, w2, s1, s3, s2, first)
    assert got is not None and got.shape == (T, D) and got.dtype == torch.bfloat16
    rb = lambda t: t.bfloat16().double()  # noqa: E731
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j]) - first
            if 0 <= e < E:
                xt = x[t].double()
                gate, up = rb(v1[e] @ xt), rb(v3[e] @ xt)
                ref[t] += float(alpha[t, j]) * rb(rb(rb(gate * torch.sigmoid(gate)) * up) @ v2[e].T)
    check(got, ref, 8 * BF16, f"moe_amx {weights} T={T} k={k} E={E} first={first} D={D} I={I}")


@AMX
@pytest.mark.parametrize("weights", WEIGHTS)
# N past a whole 16-row strip (17, 129: a partial strip, clamped rows dropped), K blocks of 32-128 (96, 160, 1056:
# FP8 scale blocks cut short), 1 and 16 rows (the tiles' extremes)
@pytest.mark.parametrize("M,N,K", [(1, 16, 32), (2, 17, 96), (4, 129, 160), (16, 200, 1056), (3, 48, 320)])
def test_linear_amx(weights, M, N, K):
    """A decode linear on AMX tiles has the C kernel's arithmetic (exact products, fp32 sums per FP8 block, one
    rounding): within half a bf16 ulp of float64, residual or not."""
    lib = native_lib.load("amx")
    g = torch.Generator().manual_seed(M * N + K)
    x, r = bf16(M, K, g=g), bf16(M, N, g=g)
    if weights == "bf16":
        w, s = bf16(N, K, g=g), None
        value = w.double()
    else:
        w, s, value = fp8_weight((N, K), weights, g)
    ref = x.double() @ value.T
    got = lib.linear_amx(x, w, s)
    assert got is not None and got.shape == (M, N) and got.dtype == torch.bfloat16
    err = ((got.double() - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max().item()
    assert err <= BF16, f"linear_amx {weights} {M}x{N}x{K}: max relative err {err:.3e}"
    check(lib.linear_amx(x, w, s, residual=r), ref + r.double(), 2 * BF16, f"linear_amx + residual {M}x{N}x{K}")


@AMX
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("M,D,I", [(1, 32, 32), (5, 96, 160), (16, 64, 1056)])
def test_mlp_amx(weights, M, D, I):
    """A dense SwiGLU MLP on AMX tiles against float64 with its one inner rounding (silu(gate) * up to bf16, as the C
    kernel's): hidden widths past an FP8 scale block, 1-16 rows, residual or not."""
    lib = native_lib.load("amx")
    g = torch.Generator().manual_seed(M + D + I)
    w1, w3, w2, s1, s3, s2, v1, v3, v2 = experts(1, I, D, g, weights)
    w1, w3, w2, v1, v3, v2 = w1[0], w3[0], w2[0], v1[0], v3[0], v2[0]
    s1, s3, s2 = (None if t is None else t[0] for t in (s1, s3, s2))
    x, r = bf16(M, D, g=g), bf16(M, D, g=g)
    gate, up = x.double() @ v1.T, x.double() @ v3.T
    ref = (gate * torch.sigmoid(gate) * up).bfloat16().double() @ v2.T
    got = lib.mlp_amx(x, w1, w3, w2, s1, s3, s2)
    assert got is not None and got.shape == (M, D) and got.dtype == torch.bfloat16
    check(got, ref, 4 * BF16, f"mlp_amx {weights} M={M} D={D} I={I}")
    check(lib.mlp_amx(x, w1, w3, w2, s1, s3, s2, residual=r), ref + r.double(), 4 * BF16, "mlp_amx + residual")


@AMX
@pytest.mark.parametrize("weights", WEIGHTS)
def test_amx_rows_do_not_depend_on_their_company(weights):
    """Row 0 of a tile product gives the same bits alone and among 2-16 rows (each C element sums its K slices in the
    hardware's own order), so a decode step of a few rows gives each prompt what it gets in any other batch on tiles;
    and shapes the tiles cannot take (K or a hidden width not a multiple of 32, more than 16 rows) are refused."""
    lib = native_lib.load("amx")
    g = torch.Generator().manual_seed(16)
    N, K, I = 70, 160, 96
    x = bf16(16, K, g=g)
    if weights == "bf16":
        w, s = bf16(N, K, g=g), None
    else:
        w, s, _ = fp8_weight((N, K), weights, g)
    w1, w3, w2, s1, s3, s2, *_ = experts(1, I, K, g, weights)
    mlp = (w1[0], w3[0], w2[0], *(None if t is None else t[0] for t in (s1, s3, s2)))
    alone = lib.linear_amx(x[:1], w, s), lib.mlp_amx(x[:1], *mlp)
    for M in range(2, 17):
        among = lib.linear_amx(x[:M], w, s)[:1], lib.mlp_amx(x[:M], *mlp)[:1]
        for what, a, b in zip(("linear", "mlp"), alone, among):
            assert torch.equal(a, b), f"{what}: row 0 among {M} rows differs from row 0 alone by {(a - b).abs().max()}"
    assert lib.linear_amx(bf16(17, K, g=g), w, s) is None
    assert lib.linear_amx(x[:2, :100].contiguous(), w[:, :100].contiguous(), None) is None
    assert lib.mlp_amx(x[:2], w1[0, :40].contiguous(), w3[0, :40].contiguous(), w2[0, :, :40].contiguous()) is None


@pytest.mark.parametrize("T,k,D", [(1, 1, 16), (7, 3, 100), (40, 8, 33)])
def test_combine_rows(lib, T, k, D):
    g = torch.Generator().manual_seed(T * k + D)
    R = T * k
    ys = bf16(R, D, g=g)
    pos = torch.randperm(R, generator=g).view(T, k)
    pos[torch.rand(T, k, generator=g) < 0.3] = -1  # another rank's expert
    w = torch.rand(T, k, generator=g)
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            if pos[t, j] >= 0:
                ref[t] += float(w[t, j]) * ys[pos[t, j]].double()
    check(lib.combine_rows(ys, pos, w), ref, BF16, f"combine_rows T={T} k={k} D={D}")
