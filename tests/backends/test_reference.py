"""The reference ops (the oracle) against float64 formulas written out independently."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.backends.reference import ReferenceKernels
from dsv3.core import fp8

K = ReferenceKernels()
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 200), (2, 1, 576)])
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g).to(dtype), torch.randn(shape[-1], generator=g).to(dtype)
    xd = x.double()
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()
    got = K.rms_norm(x, w, 1e-6)
    err = (got.double() - ref).abs().max().item()
    assert got.dtype == dtype and err <= TOL[dtype] * max(1, ref.abs().max().item()), f"max err {err:.2e}"


@pytest.mark.parametrize("dim", [8, 64])
def test_rope_is_interleaved_complex_rotation(dim):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, dim, generator=g)
    ang = torch.rand(2, 5, dim // 2, generator=g) * 10
    got = K.rope(x, ang.cos(), ang.sin())
    z = torch.view_as_complex(x.double().reshape(2, 5, 3, dim // 2, 2).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(ang.double()), ang.double())[:, :, None]).flatten(-2)
    assert (got.double() - ref).abs().max() < 1e-5


def test_fp8_dequant_is_blockwise_product():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 200, generator=g)
    q, s = fp8.quantize(w)
    assert s.shape == (3, 2)
    deq = fp8.dequantize(q, s)
    for i, j in [(0, 0), (299, 199), (128, 127), (256, 128)]:
        assert deq[i, j] == q[i, j].float() * s[i // 128, j // 128]
    assert ((deq - w).abs() / w.abs().max()).max() < 0.07


def test_act_quant_scale_floor_and_ue8m0():
    x = torch.zeros(2, 130)
    x[0, 0] = 1.0
    q, s = fp8.act_quant_reference(x)
    assert s.shape == (2, 2)
    assert s[1, 0] == pytest.approx(1e-4 / 448)  # all-zero blocks use the 1e-4 floor, not 0
    _, s8 = fp8.act_quant_reference(x, ue8m0=True)
    assert all(math.log2(v) == round(math.log2(v)) for v in s8.flatten().tolist())


def test_experts_skip_other_ranks_ids():
    from dsv3.core.kernels import ExpertWeights

    g = torch.Generator().manual_seed(3)
    E, D, I = 2, 6, 4
    ew = ExpertWeights(torch.randn(E, I, D, generator=g), torch.randn(E, D, I, generator=g),
                       torch.randn(E, I, D, generator=g), first=2)
    x = torch.randn(3, D, generator=g)
    ids = torch.tensor([[0, 2], [3, 5], [2, 3]])
    w = torch.tensor([[1.0, 0.5], [0.25, 2.0], [1.0, 1.0]])
    got = K.moe_experts(x, w, ids, ew)

    def expert(e, v):
        return ew.w2[e] @ (torch.nn.functional.silu(ew.w1[e] @ v) * (ew.w3[e] @ v))

    ref = torch.stack([0.5 * expert(0, x[0]), 0.25 * expert(1, x[1]), expert(0, x[2]) + expert(1, x[2])])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
