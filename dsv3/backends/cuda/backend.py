"""NVIDIA GPUs: FP8 block-scaled Triton kernels on sm89+, BF16 below.

FP8 weights stay FP8 in memory with their 128x128 scales; activations are quantized per token
per 128 channels right before each FP8 GEMM. Below sm89 there is no FP8 tensor core: weights are
dequantized once at load and every op is the reference in BF16 on the GPU.

Triton is imported when a backend object is created, never when this module is imported, so
`dsv3 backends` and `import dsv3` work without it. With TRITON_INTERPRET=1 the backend also runs on
CPU tensors (`dsv3.load(path, backend="cuda", device="cpu")`): that is how CI tests the kernels.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

from ...core.errors import BackendError
from ...core.fp8 import FP8_MAX, to_format
from ...core.kernels import ExpertWeights, GateParams
from ..reference import ReferenceKernels
from .launch import FUSED_QUANT_ROWS, attn_config, interpreted

log = logging.getLogger("dsv3")
_said: set[str] = set()


def say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.warning(msg)


def _no_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'dsv3[cuda]')"
    return None


def _outputs(out, copy):
    """A step's outputs (a tensor, or a tuple or list of them and other values): with copy=None, new tensors like
    them; else copied into copy's tensors (the same structure), which are returned."""
    if isinstance(out, torch.Tensor):
        return out.clone() if copy is None else copy.copy_(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_outputs(o, None if copy is None else c) for o, c in zip(out, copy or out))
    return out


class CudaKernels(ReferenceKernels):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    #: which launch table the kernels use
    target = "nvidia"
    #: the FP8 flavour this vendor computes in, when the chip has FP8 at all
    native_fp8 = torch.float8_e4m3fn

    def __init__(self, device=None):
        super().__init__(device)
        self.graphs_ok = True  # False after --no-cuda-graphs or a failed capture
        self._mla_fits: dict[tuple, bool] = {}  # (cache dtype, C, R) -> the MLA decode kernel's tiles fit this GPU
        self._graph_pool = None
        self.fp8_dtype, self.mode = self.select_mode()
        self.act_max = self.activation_max()
        from . import act_quant, fp8_gemm, gate, latent, mla_decode, moe, rms_norm, rope, weight_dequant  # noqa: F401  triton

        # through the registered torch.ops.dsv3.* ops: what another runtime or torch.compile calls is what runs here
        ops = torch.ops.dsv3
        self._act_quant, self._gemm = ops.act_quant, ops.fp8_gemm
        self._dequant, self._moe, self._mla = ops.weight_dequant, ops.fused_moe, ops.mla_decode
        self._rope, self._gate_select, self._linear = ops.rope, ops.gate_select, ops.fp8_linear
        self._swiglu, self._latent, self._rms_norm = ops.fp8_swiglu, ops.mla_latent, ops.rms_norm
        self._linear16, self._swiglu16 = ops.bf16_linear, ops.bf16_swiglu
        if self.fp8_dtype is None:
            say_once(f"{self.name}: {self.mode}")

    # ---- what this device can do --------------------------------------------------------
    def select_mode(self) -> tuple[torch.dtype | None, str]:
        """(FP8 dtype or None for BF16, why). DSV3_CUDA_CAPABILITY=8.0 forces a capability (tests, debugging)."""
        forced = os.environ.get("DSV3_CUDA_CAPABILITY")
        if forced:
            try:
                major, minor = (int(p) for p in forced.split("."))
            except ValueError:
                raise BackendError(f"DSV3_CUDA_CAPABILITY={forced!r}; expected MAJOR.MINOR such as 9.0 or 8.0") from None
        elif self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
        else:
            major, minor = 9, 0  # the interpreter: exercise the FP8 kernels
        if (major, minor) >= (8, 9):
            return self.native_fp8, f"sm{major}{minor}: FP8 e4m3fn block-scaled Triton kernels"
        return None, f"sm{major}{minor} has no FP8 (needs sm89+); running BF16 with weights dequantized at load"

    def activation_max(self) -> float:
        return FP8_MAX[torch.float8_e4m3fn]

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if getattr(torch.version, "hip", None):
            return False, "this torch is a ROCm build; use --backend rocm"
        if not torch.version.cuda:
            return False, "this torch is a CPU-only build (no CUDA); install a CUDA build of torch"
        if not torch.cuda.is_available():
            return False, "no NVIDIA GPU visible (torch.cuda.is_available() is False; check CUDA_VISIBLE_DEVICES and the driver)"
        if why := _no_triton():
            return False, why
        major, minor = torch.cuda.get_device_capability(0)
        fp8 = "FP8 e4m3fn Triton kernels" if (major, minor) >= (8, 9) else "BF16 (no FP8 below sm89)"
        return True, f"{torch.cuda.get_device_name(0)} (sm{major}{minor}): {fp8}"

    @classmethod
    def available_on(cls, device: torch.device) -> tuple[bool, str]:
        if device.type != "cpu":
            return cls.available()
        if why := _no_triton():
            return False, why
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, "on CPU tensors the Triton kernels run only under the interpreter: set TRITON_INTERPRET=1"
        return True, "Triton interpreter on CPU tensors"

    def describe(self) -> str:
        where = f"{self.device} (Triton interpreter)" if interpreted(self.device) else str(self.device)
        return f"{self.name} on {where}: {self.mode}"

    # ---- load time ----------------------------------------------------------------------
    def prepare_linear(self, weight, scale, dtype):
        if scale is None:
            return weight.to(dtype).to(self.device), None
        if self.fp8_dtype is None:
            return self.weight_dequant(weight.to(self.device), scale.to(self.device), dtype), None
        try:
            w, s = to_format(weight, scale, self.fp8_dtype)
        except ValueError as e:
            raise BackendError(f"{self.name}: cannot use an FP8 weight {list(weight.shape)}: {e}") from None
        from .fp8_gemm import split_counters

        split_counters(self.device)  # split-K's tile counters, made at load: never first inside a graph capture
        return w.to(self.device), s.float().to(self.device)

    def weight_dequant(self, weight, scale, dtype):
        if scale is None:
            return weight.to(dtype)
        if weight.device.type == "meta" or (weight.device.type == "cpu" and not interpreted(weight.device)):
            return super().weight_dequant(weight, scale, dtype)  # not where Triton can run
        return self._dequant(weight, scale.to(weight.device), dtype)

    # ---- graphs ----------------------------------------------------------------------------
    def capture_unavailable(self) -> str | None:
        if self.device.type != "cuda":
            return f"{self.name} on {self.device}: graphs need the GPU (the interpreter runs each step eagerly)"
        if not self.graphs_ok:
            return f"{self.name}: graph capture failed earlier or was switched off (--no-cuda-graphs)"
        return None

    def capture(self, fn):
        """A CUDA (HIP on ROCm) graph of fn, after two warm-up runs on a side stream (Triton compiles,
        the allocator settles); all graphs of this backend share one memory pool.

        What fn returns is copied, inside the graph, into tensors allocated outside that pool, and those are the
        outputs a replay refreshes. Graphs sharing a pool are safe only replayed in the order they were captured,
        and ours are not (batch buckets come and go, verify and draft steps interleave with decode steps): a graph
        captured later may get, for its outputs, memory an earlier graph freed after using it for temporaries, and
        that graph's next replay would overwrite them before they are read (a server row's draft logits are read
        a round later). Temporaries are dead between replays, so they may share; outputs may not."""
        if self.capture_unavailable() is not None:
            return None
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    out = fn()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            kept = _outputs(out, copy=None)  # allocated now, outside the pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                _outputs(fn(), copy=kept)
            self._graph_pool = graph.pool()
            return graph.replay, kept
        except Exception as e:  # a host sync or an uncapturable op inside the step: run eagerly, say why once
            self.graphs_ok = False
            say_once(f"{self.name}: decode-step graph capture failed ({type(e).__name__}: {e}); running eagerly")
            return None

    # ---- ops ----------------------------------------------------------------------------
    def linear(self, x, weight, scale=None):
        if scale is None:
            return F.linear(x, weight)
        if weight.dtype != self.fp8_dtype:  # only FP8 weights carry a scale past prepare_linear
            return super().linear(x, weight, scale)
        rows = x.numel() // x.shape[-1]
        if rows <= FUSED_QUANT_ROWS:  # decode: the activation is quantized inside the GEMM, one launch
            y = self._linear(x.reshape(rows, -1), weight, scale, self.act_max, self.act_ue8m0, self.target)
            return y.view(*x.shape[:-1], weight.shape[0])
        q, s = self._act_quant(x, weight.dtype, self.act_max, self.act_ue8m0)
        return self._gemm(q, s, weight, scale, x.dtype, self.target).view(*x.shape[:-1], weight.shape[0])

    def _fused_fp8(self, x, weight, scale) -> bool:
        """A decode-sized FP8 linear: the activation is quantized inside the GEMM (one launch)."""
        return (scale is not None and weight.dtype == self.fp8_dtype
                and x.numel() // x.shape[-1] <= FUSED_QUANT_ROWS)

    def _fused_16bit(self, x, weight, scale) -> bool:
        """A decode-sized linear of a 16-bit weight in x's dtype (the BF16 mode's): SwiGLU and residual epilogues in
        the same GEMM kernel, unscaled (bf16_linear, bf16_swiglu), where the vendor's GEMM would need 2-4 launches."""
        return (scale is None and weight.dtype == x.dtype and x.dtype in (torch.bfloat16, torch.float16)
                and x.numel() // x.shape[-1] <= FUSED_QUANT_ROWS)

    def linear_add(self, x, weight, scale, residual):
        rows = x.numel() // x.shape[-1]
        if residual.dtype == x.dtype and self._fused_16bit(x, weight, scale):
            y = self._linear16(x.reshape(rows, -1), weight, self.target, residual.reshape(rows, -1))
            return y.view(*x.shape[:-1], weight.shape[0])
        if not self._fused_fp8(x, weight, scale) or residual.dtype != x.dtype:
            return super().linear_add(x, weight, scale, residual)
        y = self._linear(x.reshape(rows, -1), weight, scale, self.act_max, self.act_ue8m0, self.target,
                         residual.reshape(rows, -1))  # the add in the GEMM's epilogue
        return y.view(*x.shape[:-1], weight.shape[0])

    def mlp(self, x, w1, w2, w3, s1=None, s2=None, s3=None, residual=None):
        rows = x.numel() // x.shape[-1]
        if self._fused_16bit(x, w1, s1) and self._fused_16bit(x, w3, s3):
            h = self._swiglu16(x.reshape(rows, -1), w1, w3, self.target)  # gate + up
        elif self._fused_fp8(x, w1, s1) and self._fused_fp8(x, w3, s3):
            h = self._swiglu(x.reshape(rows, -1), w1, s1, w3, s3, self.act_max, self.act_ue8m0, self.target)
        else:
            return super().mlp(x, w1, w2, w3, s1, s2, s3, residual)
        y = self.linear(h, w2, s2) if residual is None else self.linear_add(h, w2, s2, residual.reshape(rows, -1))
        return y.view(*x.shape[:-1], w2.shape[0])

    def rms_norm(self, x, weight, eps):
        return self._rms_norm(x, weight, eps)  # the arithmetic of mla_latent's kv_norm, bit for bit

    def mla_latent(self, q_pe, kv, k_pe, norm_weight, eps, cos, sin, kv_cache, pe_cache, rows, pos):
        return self._latent(q_pe, kv, k_pe, norm_weight, eps, cos, sin, kv_cache, pe_cache, rows, pos)  # one launch

    def rope(self, x, cos, sin):
        return self._rope(x, cos, sin)  # one launch for all heads of a step (the reference: ~5 ops)

    def moe_gate(self, x, weight, bias, p: GateParams):
        if p.top_k > 8 or p.scoring_func not in ("sigmoid", "softmax"):
            return super().moe_gate(x, weight, bias, p)
        logits = F.linear(x.float(), weight.float())  # [T, E] on every SM; then one selection launch
        return self._gate_select(logits, bias, p.top_k, p.n_group, p.topk_group, p.scoring_func, p.group_score,
                                 p.norm_topk_prob, p.route_scale)

    def attention(self, q, k, v, scale, mask):
        # SDPA picks a fused kernel on the GPU; the reference's fp32 [B, H, S, T] scores would not fit long prompts
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=None if mask is None else mask[:, None], scale=scale)
        return o.transpose(1, 2)  # [B, S, H, Dv]

    def mla_attention(self, q_latent, q_pe, kv, pe, scale, mask, rows=None):
        key = (kv.dtype, kv.shape[-1], pe.shape[-1])  # decided once, not per layer and step
        if key not in self._mla_fits:
            self._mla_fits[key] = attn_config(self.target, key[1], key[2], kv.element_size(), kv.device) is not None
        if not self._mla_fits[key]:
            say_once(f"{self.name}: a {kv.dtype} latent cache of width {kv.shape[-1]} does not fit this GPU's shared "
                     "memory in the MLA decode kernel; attention runs the reference ops (a bf16 cache fits)")
            return super().mla_attention(q_latent, q_pe, kv, pe, scale, mask, rows)
        step = self.current_step
        # a position step's mask is each query's prefix: its write positions (no extra launch) let the kernel stop
        # there instead of reading a mask (and keys) over the whole span
        positioned = step is not None and mask is not None and mask is step.mask and step.write_pos is not None
        last = step.write_pos.contiguous() if positioned else None
        return self._mla(q_latent, q_pe, kv, pe, scale, mask, self.target, last, rows)

    def moe_experts(self, x, weights, ids, experts: ExpertWeights):
        fp8 = experts.s1 is not None and experts.w1.dtype == self.fp8_dtype
        # bf16/fp16 experts (no FP8 on this chip, or a BF16 checkpoint): the same launches, no scales; the
        # reference's per-expert loop would size its runs on the host and keep the step out of a graph
        half = (experts.s1 is None and x.dtype in (torch.bfloat16, torch.float16)
                and experts.w1.dtype == experts.w2.dtype == experts.w3.dtype == x.dtype)
        if not (fp8 or half):
            return super().moe_experts(x, weights, ids, experts)
        return self._moe(x, weights, ids, experts.w1, experts.s1, experts.w3, experts.s3, experts.w2, experts.s2,
                         experts.first, self.act_max, self.target, self.act_ue8m0)
