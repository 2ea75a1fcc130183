"""The cpu backend against the plain-torch reference, op by op, like any other backend.

Shapes cross the cpu backend's own rules: decode sizes (< 16 rows, the C kernels) and prefill sizes
(fp32 GEMMs on CPUs without bf16 instructions, FP8 weights widened per call), dims that are not
multiples of 8/32/128, batch 1, strided inputs. Both with its C kernels and without them (plain torch
plus dtype rules), and with FP8 weights kept as FP8 (e4m3fn and e4m3fnuz) against the reference's
dequantize-then-multiply.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv3.backends.cpu import CpuKernels
from dsv3.backends.cpu import native as native_lib
from dsv3.backends.reference import ReferenceKernels
from dsv3.core import fp8
from dsv3.core.kernels import ExpertWeights, GateParams

REF = ReferenceKernels()
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to max |ref|: one bf16 rounding is 2^-8


def cpu(native: bool) -> CpuKernels:
    k = CpuKernels()
    if not native:
        k.native = None
    elif k.native is None:
        pytest.skip("no C compiler here: the cpu backend runs plain torch")
    return k


def close(got, ref, dtype, what):
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype} {got.shape} vs {ref.dtype} {ref.shape}"
    assert not got.isnan().any(), f"{what}: NaN"
    err = (got.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)
    assert err <= TOL[dtype], f"{what}: max error {err:.3e} (relative to max |ref|) > {TOL[dtype]:.0e}"


def rand(*shape, dtype, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


NATIVE = [pytest.param(True, id="C"), pytest.param(False, id="torch")]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,N,K", [(1, 1, 1), (1, 200, 300), (3, 129, 1029), (15, 64, 72), (16, 40, 56),
                                      (40, 130, 200), (4, 64, 96), (5, 64, 96), (12, 96, 32), (17, 96, 64),
                                      (300, 160, 224), (513, 32, 96)])
def test_linear_and_mlp(native, dtype, rows, N, K):
    """(5 | 12 | 17 | 300 rows, N, K multiples of 32): on AMX where the CPU has it, 4 rows just below; 513 rows: past
    that, torch"""
    k = cpu(native)
    x, w = rand(rows, K, dtype=dtype), rand(N, K, dtype=dtype, seed=1, scale=K ** -0.5)
    close(k.linear(x, w), REF.linear(x, w), dtype, "linear")
    w1, w3, w2 = rand(N, K, dtype=dtype, seed=2), rand(N, K, dtype=dtype, seed=3), rand(K, N, dtype=dtype, seed=4)
    close(k.mlp(x, w1, w2, w3), REF.mlp(x, w1, w2, w3), dtype, "mlp")


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 7), (1, 1, 576), (2, 3, 200), (1, 40, 64), (3, 300, 72)])
def test_rms_norm(native, dtype, shape):
    k = cpu(native)
    x, w = rand(*shape, dtype=dtype), rand(shape[-1], dtype=dtype, seed=1)
    close(k.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6), dtype, "rms_norm")
    wide = rand(*shape[:-1], shape[-1] + 40, dtype=dtype, seed=2)  # kv_norm's input: the front of a wider projection
    close(k.rms_norm(wide[..., :shape[-1]], w, 1e-6), REF.rms_norm(wide[..., :shape[-1]], w, 1e-6), dtype,
          "rms_norm of a column slice")


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,D", [(1, 1, 1, 8), (2, 1, 3, 16), (1, 7, 4, 64), (3, 20, 2, 32), (1, 300, 8, 64)])
def test_rope_on_a_strided_view(native, dtype, B, S, H, D):
    k = cpu(native)
    wide = rand(B, S, H, D + 24, dtype=dtype)
    x = wide[..., 24:]  # the rope part of a [.., nope + rope] projection: not contiguous
    ang = torch.rand(B, S, D // 2, generator=torch.Generator().manual_seed(5)) * 20
    close(k.rope(x, ang.cos(), ang.sin()), REF.rope(x, ang.cos(), ang.sin()), dtype, "rope")


def test_rope_tables_are_per_step_not_per_call():
    """The rotation is derived once per step (the begin_step hook), and never reused for other cos/sin."""
    from dsv3.core.model import Step

    k = cpu(False)
    ang = [torch.rand(1, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    x = rand(1, 3, 2, 8, dtype=torch.float32)
    for a in ang:
        step = Step(0, a.cos(), a.sin(), None)
        k.begin_step(step)
        close(k.rope(x, step.cos, step.sin), REF.rope(x, a.cos(), a.sin()), torch.float32, "rope in a step")
        close(k.rope(x, ang[0].cos(), ang[0].sin()), REF.rope(x, ang[0].cos(), ang[0].sin()), torch.float32,
              "rope outside the step's tensors")


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,N,C,R,V,T", [(1, 1, 1, 8, 16, 8, 8, 1), (2, 1, 3, 24, 72, 8, 40, 33),
                                             (1, 5, 2, 16, 64, 16, 32, 12)])
def test_mla_absorbed(native, dtype, B, S, H, N, C, R, V, T):
    k = cpu(native)
    q_nope, q_pe = rand(B, S, H, N, dtype=dtype), rand(B, S, H, R, dtype=dtype, seed=1)
    kv, pe = rand(B, T, C, dtype=dtype, seed=2), rand(B, T, R, dtype=dtype, seed=3)
    wd = k.absorb_dtype(dtype)
    w_uk, w_uv = rand(H, N, C, dtype=wd, seed=4, scale=N ** -0.5), rand(H, C, V, dtype=wd, seed=5, scale=C ** -0.5)
    mask = None if S == 1 else (torch.arange(T)[None, :] <= torch.arange(T - S, T)[:, None])[None].expand(B, -1, -1)
    got = k.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, 0.3, mask)
    ref = REF.mla_absorbed(q_nope, q_pe, w_uk.float(), w_uv.float(), kv, pe, 0.3, mask)
    close(got, ref, dtype, "mla_absorbed")


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("T", [29, 1100])
def test_mla_absorbed_reads_slots_in_place(native, S, T):
    """A server step: rows in slots 3, 0, 4 of a 6-slot cache (the whole cache passed, with the rows), each at its own
    length; the same as the reference on the gathered rows. The other slots hold NaN: read by no one. At T = 1100 the
    long rows' keys come in two chunks, the short row's second chunk is empty."""
    from dsv3.core.model import Step

    k = cpu(native)
    dtype, B, H, N, C, R, V = torch.bfloat16, 3, 3, 24, 72, 8, 40
    rows = torch.tensor([3, 0, 4])
    q_nope, q_pe = rand(B, S, H, N, dtype=dtype), rand(B, S, H, R, dtype=dtype, seed=1)
    kv, pe = torch.full((6, T, C), float("nan"), dtype=dtype), torch.full((6, T, R), float("nan"), dtype=dtype)
    kv[rows], pe[rows] = rand(B, T, C, dtype=dtype, seed=2), rand(B, T, R, dtype=dtype, seed=3)
    wd = k.absorb_dtype(dtype)
    w_uk, w_uv = rand(H, N, C, dtype=wd, seed=4, scale=N ** -0.5), rand(H, C, V, dtype=wd, seed=5, scale=C ** -0.5)
    pos = torch.tensor([T - S - 5, 7, T - S])[:, None] + torch.arange(S)  # [B, S]
    mask = torch.arange(T)[None, None, :] <= pos[..., None]  # [B, S, T]
    step = Step(0, torch.zeros(B, S, 1), torch.zeros(B, S, 1), mask, span=T, write_pos=pos, rows=rows)
    k.begin_step(step)
    got = k.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, 0.3, step.mask, rows)
    ref = REF.mla_absorbed(q_nope, q_pe, w_uk.float(), w_uv.float(), kv[rows], pe[rows], 0.3, mask)
    close(got, ref, dtype, "mla_absorbed over slots")


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("B,S,T", [(1, 2, 9), (3, 3, 40), (2, 5, 17), (2, 40, 100)])
def test_mla_absorbed_in_a_position_step(native, B, S, T):
    """A verification of drafts (or, S = 40, a prefill chunk): S queries per row at the row's own positions (rows at
    different lengths), each seeing its own prefix of the cache, all queries in one call."""
    from dsv3.core.model import Step

    k = cpu(native)
    dtype, H, N, C, R, V = torch.bfloat16, 3, 24, 72, 8, 40
    q_nope, q_pe = rand(B, S, H, N, dtype=dtype), rand(B, S, H, R, dtype=dtype, seed=1)
    kv, pe = rand(B, T, C, dtype=dtype, seed=2), rand(B, T, R, dtype=dtype, seed=3)
    wd = k.absorb_dtype(dtype)
    w_uk, w_uv = rand(H, N, C, dtype=wd, seed=4, scale=N ** -0.5), rand(H, C, V, dtype=wd, seed=5, scale=C ** -0.5)
    pos = torch.tensor([T - S - 2 * b for b in range(B)])[:, None] + torch.arange(S)  # [B, S]
    mask = torch.arange(T)[None, None, :] <= pos[..., None]  # [B, S, T]
    step = Step(0, torch.zeros(B, S, 1), torch.zeros(B, S, 1), mask, span=T, write_pos=pos)
    k.begin_step(step)
    got = k.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, 0.3, step.mask)
    close(got, REF.mla_absorbed(q_nope, q_pe, w_uk.float(), w_uv.float(), kv, pe, 0.3, mask), dtype,
          "mla_absorbed, position step")


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("T", [1, 3, 15, 40])
@pytest.mark.parametrize("E,n_group,topk_group,top_k,group_score", [(8, 4, 2, 2, "top2_sum"), (12, 3, 1, 3, "max"),
                                                                     (16, 1, 1, 4, "none")])
def test_moe_gate(native, T, E, n_group, topk_group, top_k, group_score):
    k = cpu(native)
    p = GateParams(top_k, n_group, topk_group, "sigmoid", group_score, True, 2.5)
    x, w, bias = rand(T, 40, dtype=torch.float32), rand(E, 40, dtype=torch.float32, seed=1), rand(E, dtype=torch.float32,
                                                                                                   seed=2, scale=0.1)
    (gw, gi), (rw, ri) = k.moe_gate(x, w, bias, p), REF.moe_gate(x, w, bias, p)
    assert torch.equal(gi.sort(-1).values, ri.sort(-1).values), "moe_gate: different experts chosen"
    close(gw.gather(1, gi.argsort(-1)), rw.gather(1, ri.argsort(-1)), torch.float32, "moe_gate weights")


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,first", [(1, 0), (3, 2), (15, 0), (40, 3)])
def test_moe_experts(native, dtype, T, first):
    k = cpu(native)
    E, D, I, top_k = 5, 72, 40, 3
    ew = ExpertWeights(rand(E, I, D, dtype=dtype, seed=1, scale=D ** -0.5), rand(E, D, I, dtype=dtype, seed=2,
                                                                                 scale=I ** -0.5),
                       rand(E, I, D, dtype=dtype, seed=3, scale=D ** -0.5), first=first)
    x = rand(T, D, dtype=dtype)
    ids = torch.randint(0, E + first + 2, (T, top_k), generator=torch.Generator().manual_seed(6))  # incl. other ranks'
    w = torch.rand(T, top_k, generator=torch.Generator().manual_seed(7))
    close(k.moe_experts(x, w, ids, ew), REF.moe_experts(x, w, ids, ew), dtype, "moe_experts")


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_dequant_bitwise(native, dtype):
    k = cpu(native)
    q, s = fp8.quantize(torch.randn(300, 200, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(k.weight_dequant(q, s, dtype), REF.weight_dequant(q, s, dtype))


def test_the_reference_is_plain_torch():
    """No C, no thresholds, no caches in the oracle: only the cpu backend has those."""
    src = (Path(native_lib.__file__).parents[1] / "reference" / "ops.py").read_text()
    for word in ("native", "UPCAST", "step_table", "_cache", "lru_cache", "ctypes"):
        assert word not in src, f"backends/reference/ops.py mentions {word!r}"
    for name in ("linear", "rms_norm", "rope", "attention", "mla_attention", "moe_gate", "moe_experts"):
        assert name in vars(ReferenceKernels), f"the reference does not implement {name} itself"


FP8 = [pytest.param(torch.float8_e4m3fn, id="e4m3fn"), pytest.param(torch.float8_e4m3fnuz, id="e4m3fnuz")]


def kept_fp8(k: CpuKernels, w: torch.Tensor, fp8_dtype):
    """A weight as the FP8-keeping backend holds it (through prepare_linear, as the loader does)."""
    q, s = fp8.quantize(w, fp8_dtype)
    got = k.prepare_linear(q, s, torch.bfloat16)
    assert got[0].dtype == fp8_dtype and got[1] is not None, "the cpu backend did not keep the FP8 weight"
    return got


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("rows,N,K", [(1, 1, 1), (1, 200, 300), (3, 129, 1029), (15, 64, 72), (16, 40, 56),
                                      (40, 130, 200), (5, 160, 96), (12, 64, 288), (17, 96, 64), (300, 160, 224),
                                      (64, 288, 1024)])
def test_fp8_weights_linear_and_mlp(fp8_dtype, rows, N, K):
    k = cpu(True)
    dtype = torch.bfloat16
    x, r = rand(rows, K, dtype=dtype), rand(rows, N, dtype=dtype, seed=9)
    w, s = kept_fp8(k, rand(N, K, dtype=torch.float32, seed=1, scale=K ** -0.5), fp8_dtype)
    close(k.linear(x, w, s), REF.linear(x, w, s), dtype, "fp8 linear")
    close(k.linear_add(x, w, s, r), REF.linear_add(x, w, s, r), dtype, "fp8 linear + residual")
    (w1, s1), (w3, s3) = (kept_fp8(k, rand(N, K, dtype=torch.float32, seed=i), fp8_dtype) for i in (2, 3))
    w2, s2 = kept_fp8(k, rand(K, N, dtype=torch.float32, seed=4), fp8_dtype)
    xr = rand(rows, K, dtype=dtype, seed=5)
    close(k.mlp(x, w1, w2, w3, s1, s2, s3, residual=xr), REF.mlp(x, w1, w2, w3, s1, s2, s3, residual=xr), dtype,
          "fp8 mlp")


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("T,first", [(1, 0), (3, 2), (15, 0), (40, 3)])
def test_fp8_weights_moe_experts(fp8_dtype, T, first):
    k = cpu(True)
    E, D, I, top_k = 5, 200, 130, 3
    stacks = []
    for seed, (n, m) in ((1, (I, D)), (2, (D, I)), (3, (I, D))):
        ws = [kept_fp8(k, rand(n, m, dtype=torch.float32, seed=seed * 10 + e, scale=m ** -0.5), fp8_dtype)
              for e in range(E)]
        stacks.append((torch.stack([w for w, _ in ws]), torch.stack([s for _, s in ws])))
    (w1, s1), (w2, s2), (w3, s3) = stacks
    ew = ExpertWeights(w1, w2, w3, s1, s2, s3, first=first)
    x = rand(T, D, dtype=torch.bfloat16)
    ids = torch.randint(0, E + first + 2, (T, top_k), generator=torch.Generator().manual_seed(6))  # incl. other ranks'
    w = torch.rand(T, top_k, generator=torch.Generator().manual_seed(7))
    close(k.moe_experts(x, w, ids, ew), REF.moe_experts(x, w, ids, ew), torch.bfloat16, "fp8 moe_experts")


def test_fp8_weights_refused_with_nan_and_kept_only_where_they_can_be():
    from dsv3.core.errors import CheckpointError, DsvError

    k = cpu(True)
    q, s = fp8.quantize(torch.randn(130, 70))
    bad = q.view(torch.uint8).clone()
    bad[3, 5] = 0x7F
    with pytest.raises(CheckpointError, match="1 NaN values"):
        k.prepare_linear(bad.view(torch.float8_e4m3fn), s, torch.bfloat16)
    w, scale = k.prepare_linear(q, s, torch.float32)  # fp32 activations: the C kernels take bf16 only
    assert w.dtype == torch.float32 and scale is None
    dequantized = CpuKernels(weights="bf16")
    assert dequantized.prepare_linear(q, s, torch.bfloat16)[0].dtype == torch.bfloat16
    with pytest.raises(DsvError, match="--dtype bf16"):
        CpuKernels(weights="fp8").prepare_linear(q, s, torch.float32)
    with pytest.raises(DsvError, match="expected one of auto, fp8, bf16"):
        CpuKernels(weights="int4")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,T,H,Dq,Dv", [(1, 1, 1, 1, 8, 8), (2, 7, 7, 3, 24, 16), (1, 33, 40, 4, 96, 64),
                                           (3, 16, 16, 2, 40, 40)])
def test_attention(dtype, B, S, T, H, Dq, Dv):
    """Prefill attention (torch's flash kernel, v padded to q's width) against the reference, with a chunk's mask:
    S queries at the end of T keys, each seeing keys up to its own position, and a padded row seeing fewer."""
    k = cpu(False)
    q, kk, v = rand(B, S, H, Dq, dtype=dtype), rand(B, T, H, Dq, dtype=dtype, seed=1), rand(B, T, H, Dv, dtype=dtype,
                                                                                           seed=2)
    mask = (torch.arange(T)[None, :] <= torch.arange(T - S, T)[:, None])[None].repeat(B, 1, 1)  # [B, S, T]
    if B > 1:
        mask[1, :, T - 2:] = False if T > 2 else mask[1, :, T - 2:]
        mask[1, :, 0] = True
    close(k.attention(q, kk, v, 0.3, mask), REF.attention(q, kk, v, 0.3, mask), dtype, "attention")
    close(k.attention(q, kk, v, 0.3, None), REF.attention(q, kk, v, 0.3, None), dtype, "attention, no mask")


@pytest.mark.parametrize("S", [5, 64])
def test_attention_of_a_prompt_from_position_0_takes_the_causal_path(S):
    """A step whose mask is plain causal (Step.causal) and whose queries are all its keys: torch's own causal path,
    the same numbers as the mask gives; a chunk after position 0 (S < T) and a step not marked causal read the mask."""
    from dsv3.core.model import Step

    k = cpu(False)
    dtype = torch.bfloat16
    q, kk, v = rand(1, S, 2, 96, dtype=dtype), rand(1, S, 2, 96, dtype=dtype, seed=1), rand(1, S, 2, 64, dtype=dtype, seed=2)
    mask = (torch.arange(S)[None, :] <= torch.arange(S)[:, None])[None]
    for causal in (True, False):
        step = Step(0, torch.zeros(1, S, 1), torch.zeros(1, S, 1), mask, causal=causal)
        k.begin_step(step)
        close(k.attention(q, kk, v, 0.3, step.mask), REF.attention(q, kk, v, 0.3, mask), dtype, f"causal={causal}")
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    spy = lambda *a, **kw: calls.append(kw["is_causal"]) or real(*a, **kw)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        k.begin_step(Step(0, torch.zeros(1, S, 1), torch.zeros(1, S, 1), mask, causal=True))
        k.attention(q, kk, v, 0.3, k.current_step.mask)
        k.attention(q[:, 1:], kk, v, 0.3, k.current_step.mask[:, 1:])  # a chunk: S < T
    assert calls == [True, False]


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("B,S,H,nope,C,R", [(1, 1, 1, 8, 16, 8), (3, 2, 4, 24, 72, 16), (2, 1, 8, 64, 256, 32)])
def test_mla_latent(native, B, S, H, nope, C, R):
    """A position step's prologue on the views the model passes (q_pe inside q, kv and k_pe inside one projection),
    into cache rows out of order: the same caches and rotated q_pe as the reference's composition."""
    k = cpu(native)
    dtype = torch.bfloat16
    q = rand(B, S, H, nope + R, dtype=dtype)
    q_pe = q[..., nope:]
    kv, k_pe = rand(B, S, C + R, dtype=dtype, seed=1).split([C, R], dim=-1)
    w = rand(C, dtype=dtype, seed=2)
    ang = torch.rand(B, S, R // 2, generator=torch.Generator().manual_seed(3)) * 20
    rows = torch.tensor([2, 0, 1, 3][:B])[:, None]
    pos = torch.tensor([[5 + s + 3 * b for s in range(S)] for b in range(B)])
    caches = [(torch.zeros(4, 16, C, dtype=dtype), torch.zeros(4, 16, R, dtype=dtype)) for _ in range(2)]
    got = k.mla_latent(q_pe, kv, k_pe, w, 1e-6, ang.cos(), ang.sin(), *caches[0], rows, pos)
    ref = REF.mla_latent(q_pe, kv, k_pe, w, 1e-6, ang.cos(), ang.sin(), *caches[1], rows, pos)
    close(got, ref, dtype, "mla_latent q_pe")
    close(caches[0][0], caches[1][0], dtype, "mla_latent kv cache")
    close(caches[0][1], caches[1][1], dtype, "mla_latent pe cache")
    assert (caches[0][0].abs().sum(-1) > 0).sum() == B * S, "written elsewhere than at (rows, pos)"


@pytest.mark.parametrize("weights", [pytest.param(None, id="bf16"), *FP8])
@pytest.mark.parametrize("isa", ["amx", "avx512"])
@pytest.mark.parametrize("T", [200, 12])
def test_prefill_moe_experts(weights, isa, T, monkeypatch):
    """A prompt's routed experts: past the one-call C kernel's routes (200 tokens), on AMX tiles where the CPU has
    them (rows sorted by expert, grouped GEMMs, one weighted combine), else per expert in torch; 12 tokens (36 routes
    over 6 experts, 11 in all), on AMX tiles where the CPU has them, else in the C kernel. Against the reference, with
    other ranks' experts and experts that get no rows."""
    from dsv3.backends.cpu.ops import AMX_ROUTES_PER_EXPERT

    if isa not in native_lib.supported_isas():
        pytest.skip(f"this CPU lacks {isa}")
    k = cpu(True)
    k.native = native_lib.load(isa)
    calls = []
    real = k.native.moe_amx
    monkeypatch.setattr(k.native, "moe_amx", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    E, D, I, top_k, first = 6, 96, 64, 3, 3
    stacks = []
    for seed, (n, m) in ((1, (I, D)), (2, (D, I)), (3, (I, D))):
        ws = [rand(n, m, dtype=torch.float32, seed=seed * 10 + e, scale=m ** -0.5) for e in range(E)]
        if weights is None:
            stacks.append((torch.stack(ws).bfloat16(), None))
        else:
            ws = [kept_fp8(k, w, weights) for w in ws]
            stacks.append((torch.stack([w for w, _ in ws]), torch.stack([s for _, s in ws])))
    (w1, s1), (w2, s2), (w3, s3) = stacks
    ew = ExpertWeights(w1, w2, w3, s1, s2, s3, first=first)
    x = rand(T, D, dtype=torch.bfloat16)
    ids = torch.randint(0, E + first + 2, (T, top_k), generator=torch.Generator().manual_seed(6))  # incl. other ranks'
    ids[ids == first + 4] = first  # expert 4 gets no rows
    assert T * top_k > native_lib_routes() or AMX_ROUTES_PER_EXPERT * (E + first + 2) <= T * top_k <= native_lib_routes()
    w = torch.rand(T, top_k, generator=torch.Generator().manual_seed(7))
    ew.total = E + first + 2  # the model's routed experts, over every rank
    close(k.moe_experts(x, w, ids, ew), REF.moe_experts(x, w, ids, ew), torch.bfloat16, f"prefill moe_experts ({isa})")
    assert len(calls) == (isa == "amx"), f"{isa}: {len(calls)} AMX calls"


def native_lib_routes() -> int:
    from dsv3.backends.cpu.ops import NATIVE_MOE_ROUTES

    return NATIVE_MOE_ROUTES
