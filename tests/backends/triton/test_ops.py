"""The kernel-level API: every torch.ops.dsv3.* op passes torch.library.opcheck (schema, fake/meta
implementation, autograd registration, and a trace under AOT dispatch), and the cuda backend itself
calls these ops, so what another runtime or torch.compile calls is what every run exercises."""

from __future__ import annotations

import pytest
import torch
from triton_targets import FN, device_for

pytest.importorskip("triton")

from dsv3.backends.cuda import (  # noqa: E402,F401  registers the ops
    act_quant,
    fp8_gemm,
    gate,
    latent,
    mla_decode,
    moe,
    rms_norm,
    rope,
    weight_dequant,
)
from dsv3.core import fp8  # noqa: E402


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cases():
    dev = device_for("nvidia")
    x = torch.randn(3, 200, generator=gen(0)).bfloat16().to(dev)
    q, s = fp8.act_quant_reference(x.cpu(), FN)
    w, ws = fp8.quantize(torch.randn(130, 200, generator=gen(1)))
    w16 = (0.05 * torch.randn(130, 200, generator=gen(5))).bfloat16().to(dev)  # the BF16 mode's weights
    E, D, inter = 3, 136, 72
    w1, s1 = zip(*(fp8.quantize(torch.randn(inter, D, generator=gen(2 + e))) for e in range(E)))
    w3, s3 = zip(*(fp8.quantize(torch.randn(inter, D, generator=gen(9 + e))) for e in range(E)))
    w2, s2 = zip(*(fp8.quantize(torch.randn(D, inter, generator=gen(20 + e))) for e in range(E)))
    stack = lambda ts: torch.stack(ts).to(dev)  # noqa: E731
    xm = torch.randn(4, D, generator=gen(30)).bfloat16().to(dev)
    ids = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 0]], device=dev)
    rw = torch.rand(4, 2, generator=gen(31)).to(dev)
    B, S, H, C, R, T = 2, 1, 4, 64, 16, 20
    ql, qp = (torch.randn(B, S, H, d, generator=gen(40 + d)).bfloat16().to(dev) for d in (C, R))
    kv, pe = (torch.randn(B, T, d, generator=gen(50 + d)).bfloat16().to(dev) for d in (C, R))
    return {
        "act_quant": (torch.ops.dsv3.act_quant.default, (x, FN, 448.0, False)),
        "act_quant_ue8m0": (torch.ops.dsv3.act_quant.default, (x, FN, 448.0, True)),
        "fp8_gemm": (torch.ops.dsv3.fp8_gemm.default, (q.to(dev), s.to(dev), w.to(dev), ws.to(dev), torch.bfloat16,
                                                        "nvidia")),
        "fp8_linear": (torch.ops.dsv3.fp8_linear.default, (x, w.to(dev), ws.to(dev), 448.0, False, "nvidia")),
        "fp8_linear_residual": (torch.ops.dsv3.fp8_linear.default, (x, w.to(dev), ws.to(dev), 448.0, False, "nvidia",
                                                                    torch.randn(3, 130, generator=gen(3)).bfloat16().to(dev))),
        "fp8_swiglu": (torch.ops.dsv3.fp8_swiglu.default, (x, w.to(dev), ws.to(dev), w.to(dev), ws.to(dev), 448.0, False,
                                                            "nvidia")),
        "bf16_linear": (torch.ops.dsv3.bf16_linear.default, (x, w16, "nvidia")),
        "bf16_linear_residual": (torch.ops.dsv3.bf16_linear.default,
                                 (x, w16, "nvidia", torch.randn(3, 130, generator=gen(4)).bfloat16().to(dev))),
        "bf16_swiglu": (torch.ops.dsv3.bf16_swiglu.default, (x, w16, w16, "nvidia")),
        "mla_latent": (torch.ops.dsv3.mla_latent.default, (qp, kv[:, :S], pe[:, :S], torch.ones(C).bfloat16().to(dev),
                                                            1e-6, *(torch.rand(B, S, R // 2, generator=gen(63)).to(dev),) * 2,
                                                            torch.zeros(3, T, C).bfloat16().to(dev),
                                                            torch.zeros(3, T, R).bfloat16().to(dev),
                                                            torch.tensor([[2], [0]], device=dev),
                                                            torch.tensor([[5], [1]], device=dev))),
        "rms_norm": (torch.ops.dsv3.rms_norm.default, (x, torch.rand(200, generator=gen(64)).bfloat16().to(dev), 1e-6)),
        "weight_dequant": (torch.ops.dsv3.weight_dequant.default, (w.to(dev), ws.to(dev), torch.bfloat16)),
        "fused_moe": (torch.ops.dsv3.fused_moe.default, (xm, rw, ids, stack(w1), stack(s1), stack(w3), stack(s3),
                                                          stack(w2), stack(s2), 0, 448.0, "nvidia", False)),
        "mla_decode": (torch.ops.dsv3.mla_decode.default, (ql, qp, kv, pe, 0.1, None, "nvidia")),
        "rope": (torch.ops.dsv3.rope.default, (qp, *(torch.rand(B, S, R // 2, generator=gen(60)).to(dev),) * 2)),
        "gate_select": (torch.ops.dsv3.gate_select.default, (torch.randn(3, 16, generator=gen(61)).to(dev),
                                                             torch.randn(16, generator=gen(62)).to(dev), 4, 4, 2,
                                                             "sigmoid", "top2_sum", True, 2.5)),
    }


@pytest.mark.parametrize("name", ["act_quant", "act_quant_ue8m0", "fp8_gemm", "fp8_linear", "fp8_linear_residual",
                                  "fp8_swiglu", "bf16_linear", "bf16_linear_residual", "bf16_swiglu",
                                  "mla_latent", "rms_norm", "weight_dequant", "fused_moe", "mla_decode", "rope",
                                  "gate_select"])
def test_opcheck(name):
    op, args = cases()[name]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if any(isinstance(a, torch.Tensor) and a.dtype == FN for a in args) and not torch.cuda.is_available():
        # test_schema compares inputs arithmetically, which torch has no CPU kernel for in float8 (on a GPU it runs)
        utils = utils[1:]
    torch.library.opcheck(op, args, test_utils=utils)


def test_the_backend_calls_the_registered_ops(monkeypatch):
    """The cuda backend's linear goes through torch.ops.dsv3 (not a private Python path)."""
    import dsv3.backends

    k = dsv3.backends.resolve("cuda", device_for("nvidia"))
    assert k._gemm is torch.ops.dsv3.fp8_gemm and k._act_quant is torch.ops.dsv3.act_quant
    assert k._linear is torch.ops.dsv3.fp8_linear
    assert k._moe is torch.ops.dsv3.fused_moe and k._mla is torch.ops.dsv3.mla_decode
    assert k._swiglu is torch.ops.dsv3.fp8_swiglu and k._latent is torch.ops.dsv3.mla_latent
    assert k._linear16 is torch.ops.dsv3.bf16_linear and k._swiglu16 is torch.ops.dsv3.bf16_swiglu
