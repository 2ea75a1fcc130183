"""The cpu backend: the plain-torch reference plus CPU speed rules, tested against the reference.

What it adds: the C kernels of native.c for decode-sized work (fewer than UPCAST_ROWS rows) and
the FP8 dequant at load, fp32 GEMMs for bf16 prefill on CPUs without bf16 instructions, and a
rope rotation derived once per step. Without a C compiler (or with DSV3_CPU_NATIVE=0) every op
that has no dtype rule is the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.kernels import ExpertWeights, GateParams
from ..reference import ReferenceKernels
from . import native as native_lib


def _native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Private torch probes, so no if absent."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


#: from this many rows, a bf16 GEMM on a CPU without bf16 instructions is faster done in fp32
#: (there it runs row by row; converting the weight costs about 12 rows' worth, measured on AVX2).
#: Below it, bf16 products are GEMVs: memory-bound, and the native kernels' job.
UPCAST_ROWS = 16


class CpuKernels(ReferenceKernels):
    name = "cpu"
    device_type = "cpu"
    fp8_dtype = None
    dist_backend = "gloo"

    def __init__(self, device=None):
        super().__init__(device)
        self.native_bf16 = _native_bf16()
        self.native = native_lib.load() if self.device.type == "cpu" else None
        self._one = (torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))  # (ids, alpha) of a lone MLP

    @classmethod
    def available(cls) -> tuple[bool, str]:
        decode = ("decode through its C kernels" if native_lib.load() is not None else
                  "decode in plain torch (C kernels off: no compiler, build failed or DSV3_CPU_NATIVE=0)")
        return True, f"always usable (BF16 or FP32, FP8 weights dequantized at load); {decode}"

    # ---- load time ----------------------------------------------------------------------
    def weight_dequant(self, weight, scale, dtype):
        if scale is not None and self.native is not None and weight.device.type == "cpu":
            return native_lib.dequantize(weight, scale, dtype)  # the same bits in one C pass (~6x torch's cast)
        return super().weight_dequant(weight, scale, dtype)

    def slow_bf16(self, dtype: torch.dtype) -> bool:
        """bf16 matmuls here run row by row (a CPU without bf16 instructions): fp32 is faster."""
        return dtype == torch.bfloat16 and self.device.type == "cpu" and not self.native_bf16

    def absorb_dtype(self, dtype):
        # a bf16 bmm of one query row per head runs ~9x slower than fp32 on such CPUs
        return torch.float32 if self.slow_bf16(dtype) else dtype

    # ---- ops ----------------------------------------------------------------------------
    def linear(self, x, weight, scale=None):
        if scale is not None:  # not on this backend (FP8 is dequantized at load): the reference's way
            return super().linear(x, weight, scale)
        rows = x.numel() // x.shape[-1]
        if rows < UPCAST_ROWS and self._native_ok(x, weight):
            # fp32 accumulation and one rounding to bf16, as F.linear; ~1.5x its bandwidth
            return self.native.linear_bf16(x.reshape(rows, -1).contiguous(), weight).view(*x.shape[:-1], weight.shape[0])
        if self.slow_bf16(x.dtype) and rows >= UPCAST_ROWS:
            # same result (fp32 accumulation, one rounding to bf16), ~8x faster on AVX2 for prefill
            return F.linear(x.float(), weight.float()).to(x.dtype)
        return F.linear(x, weight)

    def _native_ok(self, x, *weights) -> bool:
        return (self.native is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights))

    def mlp(self, x, w1, w2, w3, s1=None, s2=None, s3=None, residual=None):
        if x.numel() == x.shape[-1] and s1 is None and self._native_ok(x, w1, w2, w3):
            y = self.native.moe_bf16(x.reshape(1, -1).contiguous(), *self._one, w1, w3, w2).view(x.shape)  # one expert
            return y if residual is None else residual + y
        return super().mlp(x, w1, w2, w3, s1, s2, s3, residual)

    def rms_norm(self, x, weight, eps):
        if x.numel() < UPCAST_ROWS * x.shape[-1] and x.is_contiguous() and self._native_ok(x, weight):
            return self.native.rms_norm_bf16(x, weight, eps)  # F.rms_norm runs ~8 ops on a bf16 row
        return super().rms_norm(x, weight, eps)

    def rope(self, x, cos, sin):
        B, S = x.shape[:2]
        if (B * S < UPCAST_ROWS and self._native_ok(x) and x.stride(-1) == 1 and x.stride(0) == S * x.stride(1)
                and cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32):
            return self.native.rope_bf16(x, cos, sin)
        z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, S, H, D/2] pairs as complex
        rot = self.step_table("rotation", (cos, sin), lambda: torch.complex(cos, sin)[:, :, None, :])  # [B, S, 1, D/2]
        return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)

    def mla_absorbed(self, q_nope, q_pe, w_uk, w_uv, kv, pe, scale, mask):
        B, S, H, N = q_nope.shape
        step = self.current_step
        positioned = step is not None and mask is not None and mask is step.mask and step.write_pos is not None
        if ((S == 1 and (mask is None or positioned) or 1 < S <= 8 and positioned) and self._native_ok(q_nope)
                and q_pe.dtype == kv.dtype == pe.dtype == torch.bfloat16
                and w_uk.dtype == w_uv.dtype == torch.float32 and w_uk.is_contiguous() and w_uv.is_contiguous()
                and q_pe.stride(-1) == q_nope.stride(-1) == 1 and kv.stride(-1) == pe.stride(-1) == 1
                and kv.stride(1) == kv.shape[2] and pe.stride(1) == pe.shape[2]):
            # a position step's mask is a per-row prefix: query s of row b reads keys 0 .. write_pos[b, s] only;
            # one call per query column (S > 1: a verification of drafts), each a whole batch
            out = [self.native.mla_absorbed(q_nope[:, s], q_pe[:, s], w_uk, w_uv, kv, pe, scale,
                                            (step.write_pos[:, s] + 1).contiguous() if positioned else None)
                   for s in range(S)]
            return torch.stack(out, dim=1) if S > 1 else out[0].view(B, 1, H, -1)
        return super().mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale, mask)

    def moe_gate(self, x, weight, bias, p: GateParams):
        if x.shape[0] < UPCAST_ROWS and self._native_gate_ok(x, weight, bias, p):
            group_score = {"top2_sum": 2, "max": 1, "none": 0}[p.group_score]
            return self.native.moe_gate(x.float().contiguous(), weight, bias, p.top_k, p.n_group, p.topk_group,
                                        p.scoring_func == "sigmoid", group_score, p.norm_topk_prob, p.route_scale)
        return super().moe_gate(x, weight, bias, p)

    def _native_gate_ok(self, x, weight, bias, p: GateParams) -> bool:
        per = weight.shape[0] // p.n_group
        grouped = p.n_group > 1 and p.group_score != "none"
        return (self.native is not None and x.device.type == "cpu" and weight.dtype == torch.float32
                and weight.is_contiguous() and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
                and p.scoring_func in ("sigmoid", "softmax")
                and (not grouped or (per >= 2 and p.top_k <= p.topk_group * per)))

    def moe_experts(self, x, weights, ids, experts: ExpertWeights):
        k = ids.shape[1]
        if x.shape[0] < UPCAST_ROWS and experts.s1 is None and self._native_ok(x, experts.w1, experts.w2, experts.w3):
            # decode: one call, no host sync on the ids; other ranks' experts are skipped inside
            return self.native.moe_bf16(x.contiguous(), ids.contiguous(), weights.float().contiguous(), experts.w1,
                                        experts.w3, experts.w2, experts.first)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [T, D]
        local = (ids - experts.first).flatten()  # [T·k]
        if local.numel() <= 16:  # decode: a handful of rows, each its own expert call without sorting
            w = weights.flatten().tolist()
            rows = x if x.shape[0] == 1 else None  # one token: no per-row slicing
            for row, e in enumerate(local.tolist()):
                if 0 <= e < experts.count:
                    t = row // k
                    y = self.expert(rows if rows is not None else x[t:t + 1], experts, e)
                    out[t:t + 1].add_(y, alpha=w[row])  # fp32 accumulation of the bf16 expert output
            return out.to(x.dtype)
        return super().moe_experts(x, weights, ids, experts)
