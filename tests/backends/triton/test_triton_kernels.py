"""Each Triton kernel against the cpu reference, for every FP8 flavour (one body, parameterized).

Shapes mix ordinary and awkward sizes: M = 1, 3, 129; N, K of DeepSeek's kinds (576, 1536+64,
2112) scaled down where the interpreter is slow, and dims that are not multiples of 128.
Every comparison prints its max error, and a NaN anywhere fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_targets import FP8_TARGETS, device_for, ids

from dsv3.backends.reference import ReferenceKernels
from dsv3.core import fp8

REF = ReferenceKernels()


@pytest.fixture(params=FP8_TARGETS, ids=ids(FP8_TARGETS))
def target(request):
    return request.param


@pytest.fixture(params=["nvidia", "amd"])
def vendor(request):
    """For kernels with no FP8 in them: one run per vendor's device, not per FP8 flavour."""
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Max abs error relative to the reference's max magnitude, NaN never passing."""
    assert not got.isnan().any(), f"{what}: NaN in the kernel output"
    err = (got.double() - ref.double()).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert err <= tol, f"{what}: max error {err:.3e} (relative to max |ref|) > {tol:.0e}"


def quantized_weight(n: int, k: int, t, seed: int, experts: int | None = None):
    """A random [(E,) N, K] weight in the target's FP8 flavour with its block scales, like a checkpoint's."""
    if experts is not None:
        pairs = [quantized_weight(n, k, t, seed + e) for e in range(experts)]
        return torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs])
    return fp8.quantize(torch.randn(n, k, generator=gen(seed)) * 0.05, t.fp8)


def dequant_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-row-per-128 dequantization of an activation (the reference side of act_quant)."""
    return q.double() * s.double().repeat_interleave(128, 1)[:, : q.shape[1]]


# ---- activation quantization ---------------------------------------------------------------------
@pytest.mark.parametrize("m,k", [(1, 7168 // 8), (3, 576), (129, 1600), (2, 100)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant(target, m, k, ue8m0):
    from dsv3.backends.cuda.act_quant import act_quant

    dev = device_for(target.vendor)
    x = (torch.randn(m, k, generator=gen(m + k)) * torch.logspace(-5, 2, k)).bfloat16()
    x[0, :128] = 0  # an all-zero block takes the 1e-4 floor
    q, s = act_quant(x.to(dev), target.fp8, target.act_max, ue8m0)
    rq, rs = fp8.act_quant_reference(x, target.fp8, ue8m0=ue8m0, fp8_max=target.act_max)
    assert q.dtype == target.fp8 and s.shape == (m, math.ceil(k / 128))
    check(s.cpu(), rs, 1e-6, "scales")
    # every element within one FP8 step of the reference (a GPU's fp32 division may differ in the last bit)
    diff = (q.cpu().float() - rq.float()).abs()
    step = torch.exp2(torch.floor(torch.log2(rq.float().abs().clamp(min=2 ** -9))) - 3)
    assert (diff <= step).all(), f"max error {(diff / step).max():.2f} FP8 steps"
    assert (diff > 0).float().mean() <= 1e-3, f"{(diff > 0).sum()} elements differ from round-to-nearest-even"
    assert q.cpu().float().abs().max() <= target.act_max


# ---- block-scaled FP8 GEMM -----------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3, 129])
@pytest.mark.parametrize("n,k", [(576, 384), (1536 // 8 + 64, 576), (2112 // 4, 200), (100, 7168 // 16)])
def test_fp8_gemm(target, m, n, k):
    from dsv3.backends.cuda.act_quant import act_quant
    from dsv3.backends.cuda.fp8_gemm import fp8_gemm

    dev = device_for(target.vendor)
    x = torch.randn(m, k, generator=gen(m * n + k)).bfloat16()
    w, ws = quantized_weight(n, k, target, seed=n + k)
    q, s = act_quant(x.to(dev), target.fp8, target.act_max)
    got = fp8_gemm(q, s, w.to(dev), ws.to(dev), torch.bfloat16, target.vendor)
    ref = dequant_rows(q.cpu(), s.cpu()) @ fp8.dequantize(w, ws, torch.float64).T
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    check(got.cpu(), ref, 1e-2, f"fp8_gemm M={m} N={n} K={k}")  # bf16 output rounding


def test_fp8_gemm_rejects_mismatched_scales(target):
    from dsv3.backends.cuda.fp8_gemm import fp8_gemm

    dev = device_for(target.vendor)
    w, ws = quantized_weight(200, 256, target, seed=0)
    a = torch.zeros(4, 256, dtype=target.fp8, device=dev)
    with pytest.raises(ValueError, match=r"expected \[4, 2\] and \[2, 2\]"):
        fp8_gemm(a, torch.ones(4, 3, device=dev), w.to(dev), ws.to(dev), torch.bfloat16, target.vendor)


# ---- weight dequantization -------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(576, 300), (3, 130, 200), (128, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_dequant(target, shape, dtype):
    from dsv3.backends.cuda.weight_dequant import weight_dequant

    dev = device_for(target.vendor)
    experts = shape[0] if len(shape) == 3 else None
    w, s = quantized_weight(*shape[-2:], target, seed=sum(shape), experts=experts)
    got = weight_dequant(w.to(dev), s.to(dev), dtype).cpu()
    ref = torch.stack([fp8.dequantize(w[e], s[e]) for e in range(experts)]) if experts else fp8.dequantize(w, s)
    check(got, ref, {torch.float32: 0.0, torch.bfloat16: 2 ** -7}[dtype], f"weight_dequant {shape} {dtype}")


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_weight_dequant_decodes_every_byte(vendor, fp8_dtype):
    """The kernel decodes the bytes itself (a chip without FP8 cannot load an FP8 tensor): all 256 patterns of each
    e4m3 flavour, subnormals, -0 and NaN included, equal torch's own conversion times the block scale, exactly."""
    from dsv3.backends.cuda.weight_dequant import weight_dequant

    dev = device_for(vendor)
    w = torch.arange(256, dtype=torch.uint8).repeat(130, 1)[:, :200].contiguous().view(fp8_dtype)  # [130, 200]
    w[:, 100:] = w[:, :100].clone()  # every byte in both K blocks too
    s = torch.tensor([[0.5, 3.0], [2.0 ** -10, 7.0]])
    got = weight_dequant(w.to(dev), s.to(dev), torch.float32).cpu()
    ref = w.float() * s.repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(got.isnan(), ref.isnan()), "NaN bytes decode differently"
    bad = (got != ref) & ~ref.isnan()
    assert not bad.any(), f"{int(bad.sum())} bytes decode wrong, e.g. byte {int(w.view(torch.uint8)[bad][0])}: " \
                          f"{got[bad][0].item()} != {ref[bad][0].item()}"
    assert torch.equal(torch.signbit(got[~ref.isnan()]), torch.signbit(ref[~ref.isnan()])), "the sign of zero differs"


# ---- fused MoE ---------------------------------------------------------------------------------------
def moe_reference(x, weights, ids, w1, s1, w3, s3, w2, s2, first, t, jitter=None) -> torch.Tensor:
    """Token by token, slot by slot, in float64: quantize x, gate/up, SwiGLU (stored in bf16 as the
    kernel does), quantize, down, weight; experts outside [first, first + E) contribute nothing.
    jitter (a generator): gate and up each off by a random 2^-11 relative, the size of a GPU's FP8
    tensor-core accumulation error, to see how far that alone moves the output."""
    deq = lambda w, s, e: fp8.dequantize(w[e], s[e], torch.float64)
    xq = dequant_rows(*fp8.act_quant_reference(x, t.fp8, fp8_max=t.act_max))
    out = torch.zeros(x.shape, dtype=torch.float64)
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[i, j]) - first
            if not 0 <= e < w1.shape[0]:
                continue
            g, u = xq[i] @ deq(w1, s1, e).T, xq[i] @ deq(w3, s3, e).T
            if jitter is not None:
                g, u = (v * (1 + 2**-11 * torch.randn(v.shape, generator=jitter, dtype=torch.float64)) for v in (g, u))
            # stored in bf16, rounded to nearest even as a GPU does (and the tests' interpreter: triton_interpreter.py);
            # it is quantized again after the store, so the reference must round the same way
            h = (g * torch.sigmoid(g) * u).bfloat16()
            hq = dequant_rows(*fp8.act_quant_reference(h[None], t.fp8, fp8_max=t.act_max))[0]
            out[i] += float(weights[i, j]) * (hq @ deq(w2, s2, e).T)
    return out


@pytest.mark.parametrize("tokens,dim,inter,experts,k,first", [
    (1, 256, 128, 8, 2, 0),  # a decode step
    (3, 200, 56, 12, 3, 0),  # nothing a multiple of 128
    (129, 320, 130, 16, 4, 0),  # many tokens per expert, partial edge blocks
    (9, 200, 56, 8, 3, 8),  # expert parallel: this rank holds 8..15 of 16
])
def test_fused_moe(target, tokens, dim, inter, experts, k, first):
    from dsv3.backends.cuda.moe import fused_moe

    dev = device_for(target.vendor)
    g = gen(tokens + dim)
    x = torch.randn(tokens, dim, generator=g).bfloat16()
    total = experts if first == 0 else 2 * experts
    ids = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    w1, s1 = quantized_weight(inter, dim, target, 1, experts)
    w3, s3 = quantized_weight(inter, dim, target, 2, experts)
    w2, s2 = quantized_weight(dim, inter, target, 3, experts)
    on = [t.to(dev) for t in (x, weights, ids, w1, s1, w3, s3, w2, s2)]
    got = fused_moe(*on, first, target.act_max, target.vendor).cpu()
    args = (x, weights, ids, w1, s1, w3, s3, w2, s2, first, target)
    ref = moe_reference(*args)
    check(got, ref, 8e-3 + 2 * moe_sensitivity(ref, args), f"fused_moe T={tokens} D={dim} I={inter} E={experts} "
          f"k={k} first={first}")


@pytest.mark.parametrize("per", [1, 4])
def test_moe_combine_any_rows_per_program(target, per):
    """The combine (the last launch of fused_moe) sums the same slots in the same order however many tokens a
    program takes: the same bits as the interpreter's default block, on an expert-parallel rank (slots skipped)."""
    from dsv3.backends.cuda.moe import fused_moe

    tokens, dim, inter, experts, k, first = 9, 200, 56, 8, 3, 8
    dev, g = device_for(target.vendor), gen(per)
    x = torch.randn(tokens, dim, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(2 * experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    shapes = [(inter, dim), (inter, dim), (dim, inter)]  # w1, w3, w2 with the seeds of test_fused_moe
    ws = [quantized_weight(*shape, target, i + 1, experts) for i, shape in enumerate(shapes)]
    tensors = (x, weights, ids, *ws[0], *ws[1], *ws[2])
    on = [t.to(dev) for t in tensors]
    got = fused_moe(*on, first, target.act_max, target.vendor, rows_per_prog=per).cpu()
    whole = fused_moe(*on, first, target.act_max, target.vendor, rows_per_prog=16).cpu()
    assert torch.equal(got, whole), f"{per} tokens per program: max |diff| {(got - whole).abs().max().item():.3g}"
    args = (*tensors, first, target)
    ref = moe_reference(*args)
    check(got, ref, 8e-3 + 2 * moe_sensitivity(ref, args), f"fused_moe, {per} tokens per program")


def moe_sensitivity(ref, args) -> float:
    """How far the reference itself moves when gate and up carry a GPU's accumulation error (the worst of two
    draws, relative to max |ref|). The SwiGLU output is quantized to FP8 again: a 2^-11 change can flip its
    rounding, or the max of a 128-block and with it that block's scale and every value in it, and each flip
    moves an output by up to an FP8 step (6%) of one term. The kernel may differ from the reference by
    that much on a GPU (measured on an H200: 1.6e-2 at T=129, I=130), and by no more than it plus rounding."""
    errs = [(moe_reference(*args, jitter=gen(s)) - ref).abs().max().item() for s in (1, 2)]
    return max(errs) / max(ref.abs().max().item(), 1e-30)


@pytest.mark.parametrize("tokens,dim,inter,experts,k,first,split", [
    (1, 256, 128, 8, 2, 0, 0),  # a decode step (split-K as the table says)
    (3, 200, 56, 12, 3, 0, 1),  # nothing a multiple of 128
    (3, 200, 56 * 3, 8, 2, 0, 3),  # K over 3 programs, the last split short
    (70, 320, 130, 16, 4, 0, 1),  # more rows than the FP8 path quantizes inside the GEMM, partial edge blocks
    (9, 200, 56, 8, 3, 8, 1),  # expert parallel: this rank holds 8..15 of 16
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_moe_half_weights(vendor, tokens, dim, inter, experts, k, first, split, dtype):
    """bf16/fp16 experts (a GPU without FP8, a BF16 checkpoint) through the same launches, no scales: against
    float64 with the kernel's one rounding of the SwiGLU output; other ranks' experts contribute nothing."""
    from dsv3.backends.cuda.launch import moe_config
    from dsv3.backends.cuda.moe import fused_moe

    dev = device_for(vendor)
    g = gen(tokens + dim + inter)
    x = torch.randn(tokens, dim, generator=g).to(dtype)
    total = experts if first == 0 else 2 * experts
    ids = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    w1, w3 = ((torch.randn(experts, inter, dim, generator=g) * dim ** -0.5).to(dtype) for _ in range(2))
    w2 = (torch.randn(experts, dim, inter, generator=g) * inter ** -0.5).to(dtype)
    cfg = moe_config(tokens * k / experts, vendor, inter, dim, torch.device(dev), elt=2)
    if split:
        cfg = type(cfg)(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.group_m, split)
    xd, wd, idd, w1d, w3d, w2d = (t.to(dev) for t in (x, weights, ids, w1, w3, w2))
    got = fused_moe(xd, wd, idd, w1d, None, w3d, None, w2d, None, first, 448.0, vendor, config=cfg).cpu()
    assert got.dtype == dtype
    ref = torch.zeros(tokens, dim, dtype=torch.float64)
    for i in range(tokens):
        for j in range(k):
            e = int(ids[i, j]) - first
            if 0 <= e < experts:
                xi = x[i].double()
                gate, up = xi @ w1[e].double().T, xi @ w3[e].double().T
                h = (gate * torch.sigmoid(gate) * up).to(dtype).double()  # stored once in x's dtype
                ref[i] += float(weights[i, j]) * (h @ w2[e].double().T)
    check(got, ref, 1e-2, f"fused_moe {dtype} T={tokens} D={dim} I={inter} E={experts} k={k} first={first} "
          f"split={split}")


def test_fused_moe_refuses_mixed_weights(vendor):
    from dsv3.backends.cuda.moe import fused_moe

    dev = device_for(vendor)
    x, w = torch.zeros(2, 64, dtype=torch.bfloat16, device=dev), torch.zeros(4, 32, 64, dtype=torch.float16, device=dev)
    w2 = torch.zeros(4, 64, 32, dtype=torch.float16, device=dev)
    ids, weights = torch.zeros(2, 1, dtype=torch.long, device=dev), torch.ones(2, 1, device=dev)
    with pytest.raises(ValueError, match="expected bf16 or fp16 weights of x's dtype"):
        fused_moe(x, weights, ids, w, None, w, None, w2, None, 0, 448.0, vendor)


@pytest.mark.parametrize("splits", [2, 3])
def test_fused_moe_split_k(target, splits):
    """Both grouped GEMMs with their K blocks over several programs (K = 200 and 56: the last split is short)
    equal the unsplit launch, and leave the split-K counters at zero."""
    from dsv3.backends.cuda.fp8_gemm import split_counters
    from dsv3.backends.cuda.launch import GemmConfig
    from dsv3.backends.cuda.moe import fused_moe

    dev = device_for(target.vendor)
    g = gen(splits)
    x = torch.randn(3, 200, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(3)])
    weights = torch.rand(3, 2, generator=g)
    w1, s1 = quantized_weight(56 * 3, 200, target, 1, 8)
    w3, s3 = quantized_weight(56 * 3, 200, target, 2, 8)
    w2, s2 = quantized_weight(200, 56 * 3, target, 3, 8)
    on = [t.to(dev) for t in (x, weights, ids, w1, s1, w3, s3, w2, s2)]
    run = lambda s: fused_moe(*on, 0, target.act_max, target.vendor, config=GemmConfig(16, 64, 4, 2, split_k=s))  # noqa: E731
    check(run(splits).cpu().float(), run(1).cpu().float(), 1e-2, f"fused_moe split_k={splits}")
    assert not split_counters(torch.device(dev)).any(), "a split-K launch left a tile counter set"



# ---- split-K -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("m,n,k", [(1, 130, 7 * 128 - 56), (1, 64, 4 * 128), (3, 200, 5 * 128 + 1)])
def test_split_k_equals_one_pass(target, m, n, k, splits):
    """Split-K (K blocks over several programs, the tile's last program adds the partials up) against the
    float64 reference and the unsplit launch, for the plain GEMM and the fused linear, residual and SwiGLU
    epilogues; K is not a multiple of the split (the last split gets fewer blocks, or a shortened block);
    the arrival counters are all back at zero afterwards (the next launch, or a graph replay, relies on it)."""
    from dsv3.backends.cuda.act_quant import act_quant
    from dsv3.backends.cuda.fp8_gemm import fp8_gemm, fp8_linear, fp8_swiglu, split_counters
    from dsv3.backends.cuda.launch import GemmConfig

    dev = device_for(target.vendor)
    one, split = GemmConfig(16, 64, 4, 2, split_k=1), GemmConfig(16, 64, 4, 2, split_k=splits)
    x = torch.randn(m, k, generator=gen(m + n + splits)).bfloat16().to(dev)
    r = torch.randn(m, n, generator=gen(m + n + 3)).to(dev)
    (w1, s1), (w3, s3) = (quantized_weight(n, k, target, seed=s) for s in (21, 22))
    w1, s1, w3, s3 = (t.to(dev) for t in (w1, s1, w3, s3))
    q, s = act_quant(x, target.fp8, target.act_max)
    ref = dequant_rows(q.cpu(), s.cpu()) @ fp8.dequantize(w1.cpu(), s1.cpu(), torch.float64).T
    got = fp8_gemm(q, s, w1, s1, torch.float32, target.vendor, config=split).cpu()
    check(got, ref, 1e-5, f"fp8_gemm split_k={splits} M={m} N={n} K={k}")  # fp32 out: only the sum order differs
    lin = lambda cfg, **kw: fp8_linear(x, w1, s1, target.act_max, False, torch.float32, target.vendor,  # noqa: E731
                                       config=cfg, **kw).cpu()
    check(lin(split), lin(one), 1e-5, f"fp8_linear split_k={splits} M={m}")
    check(lin(split, residual=r), lin(one, residual=r), 1e-5, f"fp8_linear + residual split_k={splits} M={m}")
    swi = lambda cfg: fp8_swiglu(x.float(), w1, s1, w3, s3, target.act_max, False, target.vendor, config=cfg).cpu()  # noqa: E731
    check(swi(split), swi(one), 1e-5, f"fp8_swiglu split_k={splits} M={m}")
    assert not split_counters(torch.device(dev)).any(), "a split-K launch left a tile counter set"


def test_split_k_passes_nan_from_any_split(target):
    """A NaN in the K range of one split (not the last one to finish) reaches its row of the output."""
    from dsv3.backends.cuda.fp8_gemm import fp8_linear
    from dsv3.backends.cuda.launch import GemmConfig

    dev = device_for(target.vendor)
    x = torch.randn(2, 4 * 128, generator=gen(5)).bfloat16()
    x[1, 130] = float("nan")  # K block 1 of 4: the first of two splits
    w, ws = quantized_weight(70, 4 * 128, target, seed=5)
    got = fp8_linear(x.to(dev), w.to(dev), ws.to(dev), target.act_max, False, torch.float32, target.vendor,
                     config=GemmConfig(16, 64, 4, 2, split_k=2)).cpu()
    assert got[1].isnan().all() and not got[0].isnan().any(), "split-K lost or spread a NaN"

# ---- MLA decode attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("b,s,h,c,r,t", [
    (1, 1, 16, 512, 64, 1),  # DeepSeek's dims, first decode step
    (2, 1, 3, 72, 8, 37),  # odd heads, small dims
    (1, 1, 5, 144, 32, 300),  # long enough for several key slices
    (1, 1, 20, 160, 32, 70),  # two head groups of 16, the second a partial one
    (2, 4, 4, 64, 16, 20),  # several queries with a causal mask (chunked prefill through the absorbed form)
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_decode(target, b, s, h, c, r, t, dtype):
    from dsv3.backends.cuda.mla_decode import mla_decode

    dev = device_for(target.vendor)
    g = gen(b * t + c)
    ql, qp = torch.randn(b, s, h, c, generator=g), torch.randn(b, s, h, r, generator=g)
    kv, pe = torch.randn(b, t, c, generator=g), torch.randn(b, t, r, generator=g)
    mask = None
    if s > 1 or b > 1:  # causal from position t - s, with the first sequence left-padded by 3
        q_pos = torch.arange(t - s, t)
        mask = (torch.arange(t)[None, :] <= q_pos[:, None])[None].repeat(b, 1, 1)
        mask[0, :, :3] = False
    scale = 1 / math.sqrt(c + r)
    args = [z.to(dtype) for z in (ql, qp, kv, pe)]
    got = mla_decode(*[z.to(dev) for z in args], scale, None if mask is None else mask.to(dev), target.vendor)
    ref = REF.mla_attention(*[z.double() for z in args], scale, mask)
    tol = {torch.float32: 5e-3, torch.bfloat16: 2e-2}[dtype]  # fp32 runs as tf32 on NVIDIA tensor cores
    check(got.cpu(), ref, tol, f"mla_decode B={b} S={s} H={h} C={c} R={r} T={t} {dtype}")


@pytest.mark.parametrize("s,t", [(1, 37), (2, 300), (3, 70)])
def test_mla_decode_lengths_and_slots(target, s, t):
    """A position step over slots: rows in slots 4, 0, 2 of a 5-slot cache at their own lengths (`last`, no mask),
    the keys past each length and the other slots NaN (never read), over several key slices at t = 300."""
    from dsv3.backends.cuda.mla_decode import mla_decode

    dev = device_for(target.vendor)
    g = gen(7 * t + s)
    b, h, c, r = 3, 4, 72, 16
    rows = torch.tensor([4, 0, 2])
    lens = torch.tensor([t - s - 9, 1, t - s])[:, None] + 1 + torch.arange(s)  # [B, S]: query i sees keys < lens
    ql, qp = torch.randn(b, s, h, c, generator=g).bfloat16(), torch.randn(b, s, h, r, generator=g).bfloat16()
    kv, pe = torch.full((5, t, c), float("nan")).bfloat16(), torch.full((5, t, r), float("nan")).bfloat16()
    for i, slot in enumerate(rows.tolist()):
        n = int(lens[i].max())
        kv[slot, :n], pe[slot, :n] = torch.randn(n, c, generator=g), torch.randn(n, r, generator=g)
    scale = 1 / math.sqrt(c + r)
    got = mla_decode(ql.to(dev), qp.to(dev), kv.to(dev), pe.to(dev), scale, None, target.vendor, (lens - 1).to(dev),
                     rows.to(dev))
    mask = torch.arange(t)[None, None, :] < lens[..., None]  # [B, S, T]
    ref = REF.mla_attention(ql.double(), qp.double(), kv[rows].nan_to_num().double(), pe[rows].nan_to_num().double(),
                            scale, mask)
    check(got.cpu(), ref, 2e-2, f"mla_decode over slots S={s} T={t}")


#: tokens per program of the row-wise kernels: a GPU's one, a block that rarely divides the count, the interpreter's
ROWS_PER_PROGRAM = pytest.mark.parametrize("per", [1, 4, None], ids=["rows1", "rows4", "rows-default"])


@ROWS_PER_PROGRAM
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,s,h,d", [(1, 1, 1, 8), (2, 1, 3, 16), (1, 7, 5, 64), (3, 4, 128, 64), (3, 7, 2, 8)])
def test_rope(vendor, b, s, h, d, dtype, per):
    from dsv3.backends.cuda.rope import rope

    dev = device_for(vendor)
    wide = torch.randn(b, s, h, d + 24, generator=gen(1)).to(dtype)
    x = wide[..., 24:]  # the rope slice of a projection: strided
    ang = torch.rand(b, s, d // 2, generator=gen(2)) * 30
    got = rope(x.to(dev), ang.cos().to(dev), ang.sin().to(dev), per).cpu()
    ref = REF.rope(x, ang.cos(), ang.sin())
    check(got, ref, 1e-6 if dtype == torch.float32 else 8e-3, f"rope {dtype} [{b},{s},{h},{d}]")


@ROWS_PER_PROGRAM
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("e,n_group,topk_group,top_k,scoring,group_score,norm", [
    (256, 8, 4, 8, "sigmoid", "top2_sum", True),   # DeepSeek-V3
    (8, 4, 2, 2, "sigmoid", "top2_sum", True),
    (12, 3, 1, 3, "sigmoid", "max", False),
    (16, 1, 1, 4, "softmax", "none", True),
    (20, 5, 2, 6, "softmax", "top2_sum", False),
])
def test_gate_select(vendor, t, e, n_group, topk_group, top_k, scoring, group_score, norm, per):
    """Same experts and weights as the reference gate, with negative biases (dropped groups must not win)."""
    from dsv3.backends.cuda.gate import gate_select
    from dsv3.core.kernels import GateParams

    dev = device_for(vendor)
    x, w = torch.randn(t, 40, generator=gen(3)), torch.randn(e, 40, generator=gen(4))
    bias = torch.randn(e, generator=gen(5)) * 0.3 - 0.5 if scoring == "sigmoid" else None
    p = GateParams(top_k, n_group, topk_group, scoring, group_score, norm, 2.5)
    ref_w, ref_i = REF.moe_gate(x, w, bias, p)
    got_w, got_i = gate_select(torch.nn.functional.linear(x, w).to(dev), None if bias is None else bias.to(dev),
                               top_k, n_group, topk_group, scoring, group_score, norm, 2.5, per)
    assert torch.equal(got_i.cpu().sort(-1).values, ref_i.sort(-1).values), f"experts differ:\n{got_i}\n{ref_i}"
    order_g, order_r = got_i.cpu().argsort(-1), ref_i.argsort(-1)
    check(got_w.cpu().gather(1, order_g), ref_w.gather(1, order_r), 1e-6, "gate weights")


@pytest.mark.parametrize("tokens,k,experts,first,block_m", [(1, 8, 256, 0, 16), (3, 2, 8, 0, 16), (4, 3, 5, 2, 16),
                                                            (32, 8, 32, 8, 32), (64, 8, 256, 0, 64), (13, 5, 40, 3, 16),
                                                            (32, 8, 256, 0, 16)])
def test_route_kernel_equals_the_torch_routing(vendor, tokens, k, experts, first, block_m):
    """The one-program routing kernel (decode sizes) places rows exactly as the sort-based torch routing,
    ids of other ranks included, over several chunks of rows (65 rows in chunks of 64; 256 in chunks of 8)."""
    from dsv3.backends.cuda.moe import route, route_torch

    dev = device_for(vendor)
    ids = torch.randint(0, experts + 2 * first + 1, (tokens, k), generator=gen(tokens + k))
    rows, tiles = route(ids.to(dev), first, experts, block_m)
    ref_rows, ref_tiles = route_torch(ids, first, experts, block_m)
    assert torch.equal(rows.cpu(), ref_rows) and torch.equal(tiles.cpu(), ref_tiles)


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 130, 200), (3, 576, 384), (17, 100, 448), (64, 256, 576)])
def test_fp8_linear_equals_act_quant_then_gemm(target, m, n, k, ue8m0):
    """The decode linear quantizes its activation inside the GEMM: the same product as act_quant + fp8_gemm,
    and within FP8 tolerance of the dense reference."""
    from dsv3.backends.cuda.act_quant import act_quant
    from dsv3.backends.cuda.fp8_gemm import fp8_gemm, fp8_linear

    dev = device_for(target.vendor)
    x = torch.randn(m, k, generator=gen(m + n)).bfloat16().to(dev)
    w, ws = quantized_weight(n, k, target, seed=7)
    w, ws = w.to(dev), ws.to(dev)
    got = fp8_linear(x, w, ws, target.act_max, ue8m0, torch.float32, target.vendor).cpu()
    q, s = act_quant(x, target.fp8, target.act_max, ue8m0)
    two = fp8_gemm(q, s, w, ws, torch.float32, target.vendor).cpu()
    check(got, two, 1e-6, f"fp8_linear vs act_quant+gemm m={m}")
    dense = REF.linear(x.cpu().float(), fp8.dequantize(w.cpu(), ws.cpu(), torch.float32))
    check(got, dense, 0.1, f"fp8_linear vs dense m={m}")


@pytest.mark.parametrize("m,n,k", [(1, 130, 200), (3, 576, 384), (17, 100, 448)])
def test_fp8_linear_residual_and_swiglu_equal_their_composition(target, m, n, k):
    """The epilogues: + residual (one rounding) and the SwiGLU of two weights read in one pass over x."""
    from dsv3.backends.cuda.fp8_gemm import fp8_linear, fp8_swiglu

    dev = device_for(target.vendor)
    x = torch.randn(m, k, generator=gen(m + n + 1)).bfloat16().to(dev)
    r = torch.randn(m, n, generator=gen(m + n + 2)).to(dev)
    (w1, s1), (w3, s3) = (quantized_weight(n, k, target, seed=s) for s in (11, 12))
    w1, s1, w3, s3 = (t.to(dev) for t in (w1, s1, w3, s3))
    plain = fp8_linear(x, w1, s1, target.act_max, False, torch.float32, target.vendor)
    got = fp8_linear(x, w1, s1, target.act_max, False, torch.float32, target.vendor, residual=r)
    check(got.cpu(), (plain + r).cpu(), 1e-6, f"fp8_linear + residual m={m}")
    g, u = plain, fp8_linear(x, w3, s3, target.act_max, False, torch.float32, target.vendor)
    want = (g * torch.sigmoid(g) * u).cpu()
    got = fp8_swiglu(x.float(), w1, s1, w3, s3, target.act_max, False, target.vendor).cpu()
    check(got, want, 1e-5, f"fp8_swiglu m={m} n={n} k={k}")
    d1, d3 = (fp8.dequantize(w.cpu(), s.cpu(), torch.float32) for w, s in ((w1, s1), (w3, s3)))
    dense = REF.mlp(x.cpu().float(), d1, torch.eye(n), d3)  # w2 = I: silu(x w1ᵀ) · x w3ᵀ
    check(got, dense, 0.1, f"fp8_swiglu vs dense m={m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,n,k,splits", [(1, 130, 200, 1), (1, 64, 7 * 128 - 56, 3), (3, 576, 384, 1),
                                          (17, 100, 448, 2), (64, 256, 576, 1)])
def test_16bit_linear_residual_and_swiglu_against_float64(vendor, m, n, k, splits, dtype):
    """The BF16 mode's decode linears (16-bit weights, no scales) through the FP8 GEMM's kernel: x wᵀ, + residual,
    and the SwiGLU of two weights, each against float64 with the kernel's one rounding to x's dtype; K not a
    multiple of 128 or of the split, M from 1 to the fused limit."""
    from dsv3.backends.cuda.fp8_gemm import bf16_linear, bf16_swiglu, split_counters
    from dsv3.backends.cuda.launch import GemmConfig

    dev = device_for(vendor)
    g = gen(m + n + k + splits)
    x = torch.randn(m, k, generator=g).to(dtype)
    r = torch.randn(m, n, generator=g).to(dtype)
    w1, w3 = ((torch.randn(n, k, generator=g) * k ** -0.5).to(dtype) for _ in range(2))
    cfg = GemmConfig(16, 64, 4, 2, split_k=splits) if splits > 1 else None
    xd, rd, w1d, w3d = (t.to(dev) for t in (x, r, w1, w3))
    gate, up = x.double() @ w1.double().T, x.double() @ w3.double().T
    for got, want, what in ((bf16_linear(xd, w1d, vendor, config=cfg), gate, "x wᵀ"),
                            (bf16_linear(xd, w1d, vendor, rd, config=cfg), gate + r.double(), "x wᵀ + r"),
                            (bf16_swiglu(xd, w1d, w3d, vendor, config=cfg), gate * torch.sigmoid(gate) * up,
                             "silu(x w1ᵀ) x w3ᵀ")):
        assert got.dtype == dtype, what
        check(got.cpu(), want, 8e-3, f"{what} {dtype} M={m} N={n} K={k} split_k={splits}")  # one 16-bit rounding
    assert not split_counters(torch.device(dev)).any(), "a split-K launch left a tile counter set"
    bad = x.clone()
    bad[m - 1, k // 2] = float("nan")
    got = bf16_linear(bad.to(dev), w1d, vendor, config=cfg).cpu()
    assert got[m - 1].isnan().all() and not got[:m - 1].isnan().any(), "a NaN was lost or spread"


def test_16bit_linear_refuses_what_it_cannot_multiply(vendor):
    from dsv3.backends.cuda.fp8_gemm import bf16_linear, bf16_swiglu

    dev = device_for(vendor)
    x, w = torch.zeros(2, 64, dtype=torch.bfloat16, device=dev), torch.zeros(8, 64, dtype=torch.bfloat16, device=dev)
    with pytest.raises(ValueError, match="expected both bfloat16 or both float16"):
        bf16_linear(x.float(), w, vendor)
    with pytest.raises(ValueError, match=r"must be \[M, K\] and \[N, K\]"):
        bf16_linear(x, w[:, :32], vendor)
    with pytest.raises(ValueError, match=r"residual torch.bfloat16 \[2, 4\]; expected torch.bfloat16 \[2, 8\]"):
        bf16_linear(x, w, vendor, torch.zeros(2, 4, dtype=torch.bfloat16, device=dev))
    with pytest.raises(ValueError, match="must match"):
        bf16_swiglu(x, w, w[:4], vendor)


@pytest.mark.parametrize("b,s,h,c,r,slots", [
    (1, 1, 16, 512, 64, 1),  # DeepSeek's dims, one sequence
    (3, 1, 3, 72, 8, 5),  # odd heads, small dims, rows scattered over 5 slots
    (2, 4, 4, 144, 32, 2),  # several tokens per row (chunked prefill, MTP verification)
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_latent(vendor, b, s, h, c, r, slots, dtype):
    """kv_norm + both ropes + the two cache writes in one launch, against the reference's composition."""
    from dsv3.backends.cuda.latent import mla_latent

    dev = device_for(vendor)
    g = gen(b * c + s)
    q_pe = torch.randn(b, s, h, r + 5, generator=g).to(dtype)[..., 5:]  # a slice, as the model passes it
    kv_pe = torch.randn(b, s, c + r, generator=g).to(dtype)
    kv, k_pe = kv_pe.split([c, r], dim=-1)
    w = (torch.rand(c, generator=g) + 0.5).to(dtype)
    angles = torch.rand(b, s, r // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    T = 10
    rows = torch.randperm(slots, generator=g)[:b][:, None]
    pos = torch.stack([torch.randperm(T, generator=g)[:s] for _ in range(b)])
    caches = [torch.full((slots, T, d), 7.0, dtype=dtype) for d in (c, r)]
    want_q = REF.mla_latent(q_pe, kv, k_pe, w, 1e-6, cos, sin, *caches, rows, pos)
    got_caches = [z.clone().to(dev) for z in (torch.full((slots, T, c), 7.0, dtype=dtype),
                                              torch.full((slots, T, r), 7.0, dtype=dtype))]
    got_q = mla_latent(*(z.to(dev) for z in (q_pe, kv, k_pe, w)), 1e-6, cos.to(dev), sin.to(dev), *got_caches,
                       rows.to(dev), pos.to(dev))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    check(got_q.cpu(), want_q, tol, f"mla_latent q B={b} S={s} H={h} {dtype}")
    for got, want, what in zip(got_caches, caches, ("kv", "pe")):
        check(got.cpu(), want, tol, f"mla_latent {what} cache B={b} S={s} C={c} R={r} {dtype}")
        assert (got.cpu() == 7.0).sum() == (want == 7.0).sum(), f"{what}: other entries were touched"


@ROWS_PER_PROGRAM
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,sliced", [((1, 1, 7168 // 16), False), ((3, 200), False), ((2, 5, 576), True),
                                          ((129, 130), False)])
def test_rms_norm(vendor, shape, sliced, dtype, per):
    """One rounding from fp32, like F.rms_norm; a slice of a wider projection (the model's kv) is read in place."""
    from dsv3.backends.cuda.rms_norm import rms_norm

    dev = device_for(vendor)
    g = gen(shape[-1] + len(shape))
    wide = torch.randn(*shape[:-1], shape[-1] + (64 if sliced else 0), generator=g).to(dtype)
    x = wide[..., :shape[-1]]
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    got = rms_norm(x.to(dev), w.to(dev), 1e-6, per).cpu()
    want = REF.rms_norm(x.double(), w.double(), 1e-6)
    check(got, want, {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype], f"rms_norm {list(shape)} {dtype}")
