"""Plain-torch reference implementation of the kernel interface: the oracle.

One path per op, written for clarity and fp32-safe numerics (every reduction, softmax and norm
accumulates in fp32), no C, no thresholds, no caches. It runs on any torch device: vendor backends
inherit what they do not override, and every backend's parity tests (the cpu one's included)
compare against it. `--backend reference` runs it, for debugging a backend against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core import fp8
from ...core.kernels import ExpertWeights, GateParams, Kernels


class ReferenceKernels(Kernels):
    name = "reference"
    device_type = "cpu"
    fp8_dtype = None
    dist_backend = "gloo"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, "always usable: plain torch on any device, the oracle the other backends are tested against"

    # ---- load time ----------------------------------------------------------------------
    def prepare_linear(self, weight, scale, dtype):
        return self.weight_dequant(weight, scale, dtype).to(self.device), None

    def weight_dequant(self, weight, scale, dtype):
        if scale is None:
            return weight.to(dtype)
        return fp8.dequantize(weight.to("cpu") if weight.device.type == "meta" else weight, scale, dtype)

    # ---- ops ----------------------------------------------------------------------------
    def linear(self, x, weight, scale=None):
        if scale is not None:  # an FP8 weight a subclass kept: dequantize on the fly (slow, correct)
            weight = fp8.dequantize(weight, scale, x.dtype)
        return F.linear(x, weight)  # torch accumulates bf16 products in fp32 and rounds once

    def rms_norm(self, x, weight, eps):
        # one fused op; it accumulates in fp32 and rounds once, so bf16/fp16 inputs need no fp32 copies
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)

    def rope(self, x, cos, sin):
        z = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [B, S, H, D/2] pairs as complex
        rot = torch.complex(cos, sin)[:, :, None, :]  # [B, S, 1, D/2]
        return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)

    def attention(self, q, k, v, scale, mask):
        scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * scale  # [B, H, S, T]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        return torch.einsum("bhst,bthd->bshd", scores.softmax(dim=-1), v.float()).to(q.dtype)  # [B, S, H, Dv]

    def mla_attention(self, q_latent, q_pe, kv, pe, scale, mask, rows=None):
        # nope and rope scores as two batched matmuls over [B, S·H] query rows: the cache is read in
        # place (concatenating it with pe would copy the whole cache every layer and step)
        if rows is not None:  # slots of the whole cache: gathered (a kernel reads them in place)
            kv, pe = kv[rows], pe[rows]  # [B, T, C], [B, T, R]
        B, S, H, C = q_latent.shape
        k, p = kv.float(), pe.float()  # [B, T, C], [B, T, R]
        scores = torch.baddbmm(torch.bmm(q_pe.float().reshape(B, S * H, -1), p.transpose(1, 2)),
                               q_latent.float().reshape(B, S * H, C), k.transpose(1, 2))
        scores = scores.view(B, S, H, -1) * scale  # [B, S, H, T]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
        out = torch.bmm(scores.softmax(dim=-1).view(B, S * H, -1), k)  # [B, S·H, C]
        return out.view(B, S, H, C).to(q_latent.dtype)

    def moe_gate(self, x, weight, bias, p: GateParams):
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

    def moe_experts(self, x, weights, ids, experts: ExpertWeights):
        """Rows sorted by expert, each expert run once on its rows, results added back in fp32."""
        k = ids.shape[1]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [T, D]
        local = (ids - experts.first).flatten()  # [T·k]
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
            y = self.expert(x[tok], experts, e)  # [n, D]
            out.index_add_(0, tok, y.float() * weights.flatten()[rows, None].float())
        return out.to(x.dtype)

    def expert(self, h: torch.Tensor, experts: ExpertWeights, e: int) -> torch.Tensor:
        """SwiGLU expert e (local index) on rows h [n, D]."""
        scale = lambda s: None if s is None else s[e]  # noqa: E731
        gate = self.linear(h, experts.w1[e], scale(experts.s1))
        up = self.linear(h, experts.w3[e], scale(experts.s3))
        return self.linear(F.silu(gate) * up, experts.w2[e], scale(experts.s2))
