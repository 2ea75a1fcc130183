"""Ascend NPUs (910B/910C): BF16 on torch_npu's fused ops. No FP8 on these chips: FP8 weights are
dequantized on the host, tensor by tensor, then moved (or come from `dsv3 convert dequant`).

Every op follows the documented torch_npu API only (shared/reference/ascend-ops.md). Where a fused
op's documented limits reject a shape, that op falls back to the reference for the call and says
so once in the log. torch_npu is imported when the backend is created, never at `import dsv3`.
With `device="cpu"` the same code runs on CPU tensors against whatever `import torch_npu` finds:
the tests put an emulation of the documented semantics there.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import torch

from ...core.kernels import ExpertWeights, GateParams
from ..reference import ReferenceKernels

log = logging.getLogger("dsv3")

#: npu_fused_infer_attention_score's fixed causal mask for sparse_mode 2/3
CAUSAL_MASK_SIZE = 2048
#: the MLA decode path takes query head counts that are powers of two up to this
MAX_MLA_HEADS = 128


def _import_torch_npu():
    return importlib.import_module("torch_npu")


class AscendKernels(ReferenceKernels):
    name = "ascend"
    device_type = "npu"
    fp8_dtype = None
    dist_backend = "hccl"

    def __init__(self, device=None):
        self.npu = _import_torch_npu()  # registers the npu device type: before torch.device("npu")
        super().__init__(device)
        #: ops that fell back to the reference at least once (each logged once)
        self.fallbacks: set[str] = set()
        self._causal: torch.Tensor | None = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("torch_npu") is None:
            return False, "torch_npu is not installed (pip install 'dsv3[ascend]' on a machine with the CANN toolkit)"
        try:
            _import_torch_npu()
        except Exception as e:
            return False, (f"torch_npu failed to import ({type(e).__name__}: {e}); CANN libraries not found: "
                           "source /usr/local/Ascend/ascend-toolkit/set_env.sh first")
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            return False, "torch_npu imports but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES and npu-smi info)"
        return True, f"{npu.device_count()} NPU(s): BF16 on torch_npu fused ops"

    @classmethod
    def available_on(cls, device: torch.device) -> tuple[bool, str]:
        if device.type != "cpu":
            return cls.available()
        if importlib.util.find_spec("torch_npu") is None:
            return False, "no torch_npu module to run on CPU tensors (tests put an emulation on sys.path)"
        return True, "torch_npu ops on CPU tensors"

    def describe(self) -> str:
        version = getattr(self.npu, "__version__", "?")
        return f"{self.name} on {self.device}: BF16, torch_npu {version}"

    def fallback(self, op: str, why: str) -> None:
        if op not in self.fallbacks:
            self.fallbacks.add(op)
            log.warning(f"ascend: {op} falls back to the reference: {why}")

    # ---- norms and rope -------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps):
        return self.npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]

    def rope(self, x, cos, sin):
        """x [B, S, H, D]. D = 64 in bf16/fp16 takes npu_interleave_rope, whose output is the interleaved
        result in a fixed permutation (evens then odds); the interface allows that because only
        products of roped q and k are consumed. Other dims take npu_rotary_mul in interleave mode."""
        D = x.shape[-1]
        if D == 64 and x.dtype in (torch.bfloat16, torch.float16):
            c, s = self.step_table(f"interleave_rope {x.dtype}", (cos, sin), lambda: tuple(
                torch.cat([t, t], dim=-1)[:, None].to(x.dtype) for t in (cos, sin)))  # [B, 1, S, 64]: [c0..c31, c0..c31]
            out = self.npu.npu_interleave_rope(x.transpose(1, 2).contiguous(), c, s)  # (B, N, S, D)
            return out.transpose(1, 2)
        if D % 2 or D >= 896:
            self.fallback("rope", f"npu_rotary_mul needs an even head dim < 896, got {D}")
            return super().rope(x, cos, sin)
        c, s = self.step_table(f"rotary_mul {x.dtype}", (cos, sin), lambda: tuple(
            t.repeat_interleave(2, dim=-1)[:, :, None].to(x.dtype) for t in (cos, sin)))  # [B, S, 1, D]: (c0, c0, c1, ...)
        try:
            return self.npu.npu_rotary_mul(x, c, s, rotary_mode="interleave")
        except TypeError:  # op-plugin before 7.0.0 has no rotary_mode
            self.fallback("rope", "this torch_npu's npu_rotary_mul has no rotary_mode='interleave'")
            return super().rope(x, cos, sin)

    # ---- attention ------------------------------------------------------------------------------
    def causal_mask(self, device) -> torch.Tensor:
        if self._causal is None or self._causal.device != device:
            self._causal = torch.triu(torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device), 1)
        return self._causal

    def is_right_down_causal(self, mask: torch.Tensor) -> bool:
        """Is every sequence's mask the plain causal one (no padding)? Decided once per step."""
        def decide():
            S, T = mask.shape[1:]
            q_pos = torch.arange(T - S, T, device=mask.device)
            causal = torch.arange(T, device=mask.device)[None, :] <= q_pos[:, None]
            return bool((mask == causal).all())
        return self.step_table("right_down_causal", (mask,), decide)

    def attention(self, q, k, v, scale, mask):
        """Naive MLA prefill. Unpadded bf16 batches take TND with the right-down causal sparse mode;
        padded or fp32 ones take BSND with the full mask (1 = masked)."""
        B, S, H, _ = q.shape
        T = k.shape[1]
        if mask is not None and q.dtype == torch.bfloat16 and T <= CAUSAL_MASK_SIZE and self.is_right_down_causal(mask):
            out, _ = self.npu.npu_fused_infer_attention_score(
                q.reshape(B * S, H, -1), k.reshape(B * T, H, -1), v.reshape(B * T, H, -1),
                atten_mask=self.causal_mask(q.device), actual_seq_lengths=[S * (i + 1) for i in range(B)],
                actual_seq_lengths_kv=[T * (i + 1) for i in range(B)], num_heads=H, scale=scale,
                input_layout="TND", sparse_mode=3)
            return out.view(B, S, H, -1)
        out, _ = self.npu.npu_fused_infer_attention_score(
            q, k, v, atten_mask=None if mask is None else ~mask[:, None], num_heads=H, scale=scale,
            input_layout="BSND", sparse_mode=0)
        return out

    def mla_attention(self, q_latent, q_pe, kv, pe, scale, mask, rows=None):
        """Absorbed MLA: one latent KV head shared by all query heads, rope parts passed separately."""
        if rows is not None:  # slots of the whole cache: the op takes one row per sequence
            kv, pe = kv[rows], pe[rows]
        H = q_latent.shape[2]
        heads = 1 << (H - 1).bit_length()  # the op takes powers of two: pad with zero heads
        if heads > MAX_MLA_HEADS:
            self.fallback("mla_attention", f"{H} query heads per rank; the fused op takes at most {MAX_MLA_HEADS}")
            return super().mla_attention(q_latent, q_pe, kv, pe, scale, mask)
        if heads != H:
            pad = (0, 0, 0, heads - H)
            q_latent, q_pe = torch.nn.functional.pad(q_latent, pad), torch.nn.functional.pad(q_pe, pad)
        out, _ = self.npu.npu_fused_infer_attention_score(
            q_latent, kv[:, :, None], kv[:, :, None], query_rope=q_pe, key_rope=pe[:, :, None],
            atten_mask=None if mask is None else ~mask[:, None], num_heads=heads, num_key_value_heads=1,
            scale=scale, input_layout="BSND", sparse_mode=0)
        return out[:, :, :H]

    # ---- MoE -----------------------------------------------------------------------------------
    def moe_gate(self, x, weight, bias, p: GateParams):
        E = weight.shape[0]
        groups = p.n_group if p.group_score != "none" else 1
        # the op renormalizes exactly when it applies sigmoid (norm_type 1), and only per group of > 2 experts
        renorms = p.norm_topk_prob and p.top_k > 1
        if (p.scoring_func == "sigmoid") != renorms or E % groups or E // groups <= 2:
            self.fallback("moe_gate", f"scoring {p.scoring_func} with norm_topk_prob={p.norm_topk_prob}, "
                                      f"{E} experts in {groups} groups is outside npu_moe_gating_top_k")
            return super().moe_gate(x, weight, bias, p)
        logits = torch.nn.functional.linear(x.float(), weight.float())  # [T, E] fp32: near-ties decide
        y, idx, _ = self.npu.npu_moe_gating_top_k(
            logits, p.top_k, bias=None if bias is None else bias.float(), k_group=p.topk_group if groups > 1 else 1,
            group_count=groups, group_select_mode=1 if p.group_score == "top2_sum" else 0, renorm=0,
            norm_type=1 if p.scoring_func == "sigmoid" else 0, out_flag=False,
            routed_scaling_factor=p.route_scale, eps=1e-20)
        return y.float(), idx.long()

    def moe_experts(self, x, weights, ids, experts: ExpertWeights):
        """init_routing_v2 (sort rows by expert) -> grouped matmuls (gate, up) -> swiglu -> grouped matmul
        (down) -> gather each token's k rows back and weight them. Rows routed to another rank's experts
        go to an extra group past the local ones and are never multiplied."""
        T, k = ids.shape
        E = experts.count
        local = ids - experts.first
        here = (local >= 0) & (local < E)
        local = torch.where(here, local, E).to(torch.int32)
        rows, row_idx, counts, _ = self.npu.npu_moe_init_routing_v2(
            x, local, active_num=T * k, expert_num=E + 1, expert_tokens_num_type=1, expert_tokens_num_flag=True,
            row_idx_type=0)
        n_here = int(counts[:E].sum())  # one host sync: grouped matmul must be told its row count
        down = torch.zeros(T * k, x.shape[1], dtype=x.dtype, device=x.device)
        if n_here:
            group_list = counts[:E].to(torch.int64)
            mm = lambda a, w: self.npu.npu_grouped_matmul(
                [a], [w.transpose(1, 2)], group_list=group_list, split_item=2, group_type=0, group_list_type=1)[0]
            a = rows[:n_here]
            h = self.npu.npu_swiglu(torch.cat([mm(a, experts.w1), mm(a, experts.w3)], dim=-1), dim=-1)
            down[:n_here] = mm(h, experts.w2)
        picked = down[row_idx.long()].view(T, k, -1)  # row_idx[j] = sorted position of (token, slot) j
        return (picked.float() * weights[..., None].float()).sum(1).to(x.dtype)
