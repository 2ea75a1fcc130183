"""Plain-torch reference implementation of the kernel interface.

Written for clarity and fp32-safe numerics: every reduction, softmax and norm runs in fp32.
It runs on any torch device, so vendor backends inherit what they do not override, and their
tests compare against it. It is also the production path on CPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core import fp8
from ...core.kernels import ExpertWeights, GateParams, Kernels
from . import native as native_lib


def _native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Private torch probes, so no if absent."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


#: from this many rows, a bf16 GEMM on a CPU without bf16 instructions is faster done in fp32
#: (there it runs row by row; converting the weight costs about 12 rows' worth, measured on AVX2).
#: Below it, bf16 products are GEMVs: memory-bound, and the native kernels' job.
UPCAST_ROWS = 16


class CpuKernels(Kernels):
    name = "cpu"
    device_type = "cpu"
    fp8_dtype = None
    dist_backend = "gloo"
    #: use native.c for bf16 GEMVs and decode experts (subclasses running elsewhere turn it off)
    native_kernels = True

    def __init__(self, device=None):
        super().__init__(device)
        self.native_bf16 = _native_bf16()
        self._per_forward: dict[str, tuple[tuple, object]] = {}
        self.native = native_lib.load() if self.native_kernels and self.device.type == "cpu" else None
        self._one = (torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))  # (ids, alpha) of a lone MLP

    @classmethod
    def available(cls) -> tuple[bool, str]:
        decode = ("decode through its C kernels" if native_lib.load() is not None else
                  "decode in plain torch (C kernels off: no compiler, build failed or DSV3_CPU_NATIVE=0)")
        return True, f"always usable (BF16 or FP32, FP8 weights dequantized at load); {decode}"

    # ---- load time ----------------------------------------------------------------------
    def prepare_linear(self, weight, scale, dtype):
        return self.weight_dequant(weight, scale, dtype).to(self.device), None

    def weight_dequant(self, weight, scale, dtype):
        if scale is None:
            return weight.to(dtype)
        weight = weight.to("cpu") if weight.device.type == "meta" else weight
        if self.native is not None:  # the same bits in one C pass (~6x torch's fp8 cast)
            return native_lib.dequantize(weight, scale, dtype)
        return fp8.dequantize(weight, scale, dtype)

    def slow_bf16(self, dtype: torch.dtype) -> bool:
        """bf16 matmuls here run row by row (a CPU without bf16 instructions): fp32 is faster."""
        return dtype == torch.bfloat16 and self.device.type == "cpu" and not self.native_bf16

    def absorb_dtype(self, dtype):
        # a bf16 bmm of one query row per head runs ~9x slower than fp32 on such CPUs
        return torch.float32 if self.slow_bf16(dtype) else dtype

    # ---- ops ----------------------------------------------------------------------------
    def linear(self, x, weight, scale=None):
        if scale is not None:  # an FP8 weight a subclass kept: dequantize on the fly (slow, correct)
            weight = fp8.dequantize(weight, scale, x.dtype)
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

    def mlp(self, x, w1, w2, w3, s1=None, s2=None, s3=None):
        if x.numel() == x.shape[-1] and s1 is None and self._native_ok(x, w1, w2, w3):
            return self.native.moe_bf16(x.reshape(1, -1).contiguous(), *self._one, w1, w3, w2).view(x.shape)  # one expert
        return super().mlp(x, w1, w2, w3, s1, s2, s3)

    def rms_norm(self, x, weight, eps):
        if x.numel() < UPCAST_ROWS * x.shape[-1] and x.is_contiguous() and self._native_ok(x, weight):
            return self.native.rms_norm_bf16(x, weight, eps)  # F.rms_norm runs ~8 ops on a bf16 row
        # one fused op; it accumulates in fp32 and rounds once, so bf16/fp16 inputs need no fp32 copies
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)

    def rope(self, x, cos, sin):
        B, S = x.shape[:2]
        if (B * S < UPCAST_ROWS and self._native_ok(x) and x.stride(-1) == 1 and x.stride(0) == S * x.stride(1)
                and cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32):
            return self.native.rope_bf16(x, cos, sin)
        z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, S, H, D/2] pairs as complex
        rot = self.per_forward("rotation", (cos, sin), lambda: torch.complex(cos, sin)[:, :, None, :])  # [B, S, 1, D/2]
        return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)

    def per_forward(self, name: str, inputs: tuple, build):
        """build() once for these input tensors. Every layer of a forward passes the same cos/sin/mask
        objects, so derived tables are made once per forward. The inputs themselves are kept (not their
        ids, which a freed tensor hands on to the next one)."""
        cache = self._per_forward
        hit = cache.get(name)
        if hit is None or len(hit[0]) != len(inputs) or any(a is not b for a, b in zip(hit[0], inputs)):
            hit = cache[name] = (inputs, build())
        return hit[1]

    def attention(self, q, k, v, scale, mask):
        scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * scale  # [B, H, S, T]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        return torch.einsum("bhst,bthd->bshd", scores.softmax(dim=-1), v.float()).to(q.dtype)  # [B, S, H, Dv]

    def mla_attention(self, q_latent, q_pe, kv, pe, scale, mask):
        # nope and rope scores as two batched matmuls over [B, S·H] query rows: the cache is read in
        # place (concatenating it with pe would copy the whole cache every layer and step)
        B, S, H, C = q_latent.shape
        k, p = kv.float(), pe.float()  # [B, T, C], [B, T, R]
        scores = torch.baddbmm(torch.bmm(q_pe.float().reshape(B, S * H, -1), p.transpose(1, 2)),
                               q_latent.float().reshape(B, S * H, C), k.transpose(1, 2))
        scores = scores.view(B, S, H, -1) * scale  # [B, S, H, T]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        out = torch.bmm(scores.softmax(dim=-1).view(B, S * H, -1), k)  # [B, S·H, C]
        return out.view(B, S, H, C).to(q_latent.dtype)

    def mla_absorbed(self, q_nope, q_pe, w_uk, w_uv, kv, pe, scale, mask):
        B, S, H, N = q_nope.shape
        if (S == 1 and mask is None and self._native_ok(q_nope) and q_pe.dtype == kv.dtype == pe.dtype == torch.bfloat16
                and w_uk.dtype == w_uv.dtype == torch.float32 and w_uk.is_contiguous() and w_uv.is_contiguous()
                and q_pe.stride(-1) == q_nope.stride(-1) == 1 and kv.stride(-1) == pe.stride(-1) == 1
                and kv.stride(1) == kv.shape[2] and pe.stride(1) == pe.shape[2]):
            y = self.native.mla_absorbed(q_nope[:, 0], q_pe[:, 0], w_uk, w_uv, kv, pe, scale)  # one call per layer
            return y.view(B, 1, H, -1)
        return super().mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale, mask)

    def moe_gate(self, x, weight, bias, p: GateParams):
        if x.shape[0] < UPCAST_ROWS and self._native_gate_ok(x, weight, bias, p):
            group_score = {"top2_sum": 2, "max": 1, "none": 0}[p.group_score]
            return self.native.moe_gate(x.float().contiguous(), weight, bias, p.top_k, p.n_group, p.topk_group,
                                        p.scoring_func == "sigmoid", group_score, p.norm_topk_prob, p.route_scale)
        logits = F.linear(x.float(), weight.float())  # [T, E]
        scores = logits.sigmoid() if p.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if bias is None else scores + bias.float()  # the bias only steers selection
        if p.n_group > 1 and p.group_score != "none":
            groups = choice.unflatten(-1, (p.n_group, -1))  # [T, G, E/G]
            if p.group_score == "top2_sum":
                group_scores = groups.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = groups.amax(dim=-1)
            keep = group_scores.topk(p.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            # -inf, not 0: with negative biases a 0 would let dropped groups win
            choice = groups.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        ids = choice.topk(p.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
        if p.norm_topk_prob and p.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * p.route_scale, ids

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
                    y = self._expert(rows if rows is not None else x[t:t + 1], experts, e)
                    out[t:t + 1].add_(y, alpha=w[row])  # fp32 accumulation of the bf16 expert output
            return out.to(x.dtype)
        order = local.argsort(stable=True)
        counts = torch.bincount(local.clamp(0, experts.count), minlength=experts.count + 1).tolist()
        # ids below `first` clamp to 0: skip them by starting after the ones that are < 0
        start = int((local < 0).sum())
        counts[0] -= start
        for e in range(experts.count):
            n = counts[e]
            if n == 0:
                continue
            rows = order[start:start + n]
            start += n
            tok = rows // k
            y = self._expert(x[tok], experts, e)  # [n, D]
            out.index_add_(0, tok, y.float() * weights.flatten()[rows, None].float())
        return out.to(x.dtype)

    def _expert(self, h: torch.Tensor, experts: ExpertWeights, e: int) -> torch.Tensor:
        """SwiGLU expert e (local index) on rows h [n, D]."""
        scale = lambda s: None if s is None else s[e]  # noqa: E731
        gate = self.linear(h, experts.w1[e], scale(experts.s1))
        up = self.linear(h, experts.w3[e], scale(experts.s3))
        return self.linear(F.silu(gate) * up, experts.w2[e], scale(experts.s2))
