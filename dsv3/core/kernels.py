"""The kernel interface: every op the model core needs, and nothing vendor-specific.

The model holds one `Kernels` object and calls only these methods. `backends/reference` implements
all of them in plain torch (the numerical oracle); every backend, the cpu one included, subclasses
it and overrides what it accelerates. Shapes use B batch, S query length, T key length, H heads, D dims.

Conventions every implementation follows:
- `mask` is a bool tensor [B, S, T], True where the query may attend to the key, or None when
  every key is visible (a single decode step without padding).
- A linear weight is [N, K] (out, in). Its `scale` is None for a dense weight, or the fp32
  block scale [ceil(N/128), ceil(K/128)] of an FP8 weight (real = fp8 * scale per block).
- Rotary embedding is interleaved: pairs (x0, x1), (x2, x3), ... rotate by one angle each. The
  model only multiplies roped q by roped k, so a backend may return the rotated dims in any fixed
  permutation applied identically on every call (Ascend's fused rope returns evens, then odds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: `Kernels.absorb_max_queries`' default: a decode step, 1 + k drafts absorbed; a prefill naive
ABSORB_MAX_QUERIES = 8


@dataclass(frozen=True)
class GateParams:
    """Static routing parameters; one per model."""

    top_k: int
    n_group: int
    topk_group: int
    scoring_func: str  # "sigmoid" | "softmax"
    group_score: str  # "top2_sum" (noaux_tc) | "max" (group_limited_greedy) | "none"
    norm_topk_prob: bool
    route_scale: float


@dataclass
class ExpertWeights:
    """The routed experts one rank holds, stacked: w1/w3 [E, I, D], w2 [E, D, I] (+ block scales).

    `first` is the global id of expert 0 here, so ids in [first, first + E) are computed on
    this rank and the rest are someone else's; `total` is the model's number of routed experts
    (0: this rank holds them all), for a backend that sizes its work by routes per expert.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    s3: torch.Tensor | None = None
    first: int = 0
    total: int = 0

    @property
    def count(self) -> int:
        return self.w1.shape[0]

    @property
    def routed(self) -> int:
        """The model's number of routed experts, over every rank."""
        return self.total or self.count


class Kernels:
    """Abstract kernel interface. Attributes describe the backend; methods are the ops."""

    name: str = "abstract"
    #: default torch device string for this backend's tensors
    device_type: str = "cpu"
    #: FP8 dtype weights stay in at run time, or None when weights are dequantized at load
    fp8_dtype: torch.dtype | None = None
    #: torch.distributed backend name
    dist_backend: str = "gloo"
    #: an FP8 weight whose tensor-parallel slice cuts through 128x128 scale blocks may be dequantized at load
    #: instead of refused (a backend whose ops take dense and FP8 weights alike)
    fp8_split_dequantizes: bool = False

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else self.device_type)
        self.current_step = None
        self._step_tables: dict[str, object] = {}
        #: activation scales rounded up to powers of two (V3.1's scale_fmt "ue8m0"); set by configure
        self.act_ue8m0 = False
        #: the generation loop said once why this backend runs the decode step without a graph
        self.said_no_capture = False

    # ---- graphs ----------------------------------------------------------------------------
    def capture_unavailable(self) -> str | None:
        """Why this backend cannot capture the decode step as a graph (None: it can)."""
        return f"the {self.name} backend runs each step eagerly (no graph capture)"

    def can_capture(self) -> bool:
        return self.capture_unavailable() is None

    def capture(self, fn):
        """Record fn() (a decode step reading and writing only tensors that stay allocated) as a graph.
        Returns (replay, outputs): replay() reruns it on the same buffers and outputs holds fn's result,
        refreshed by each replay; or None when capture is impossible or failed (the caller runs fn)."""
        return None

    def configure(self, cfg) -> None:
        """Called by the loader once config.json is read, before any weight: the model-level facts a
        backend's arithmetic depends on. FP8 backends read the activation scale format here."""
        self.act_ue8m0 = cfg.quant is not None and cfg.quant.scale_fmt == "ue8m0"

    # ---- the step hook --------------------------------------------------------------------
    def begin_step(self, step) -> None:
        """Called by the model once for each step (a forward's positions: rope cos/sin and mask) before any
        op sees it. Every layer of the step passes the same cos/sin/mask, so a backend may derive tables
        from them once per step (see step_table); the base forgets the previous step's tables here."""
        self.current_step = step
        self._step_tables = {}

    def step_table(self, name: str, inputs: tuple, build):
        """build() once per step, for a table derived from `inputs`, which must be the current step's own
        tensors (cos, sin, mask); an op called outside a step (as tests do) gets a fresh build."""
        step = self.current_step
        if step is None or not all(any(t is s for s in (step.cos, step.sin, step.mask)) for t in inputs):
            return build()
        if name not in self._step_tables:
            self._step_tables[name] = build()
        return self._step_tables[name]

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(usable here?, one line saying why or why not)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs: what this backend runs as on this machine."""
        fp8 = str(self.fp8_dtype).replace("torch.", "") if self.fp8_dtype else "none (dequantized at load)"
        return f"{self.name} on {self.device}, fp8 weights: {fp8}"

    # ---- load time ----------------------------------------------------------------------
    def prepare_linear(
        self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turn a checkpoint weight (+ FP8 block scale) into what `linear` consumes, on this device."""
        raise NotImplementedError

    def weight_dequant(self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """A dense copy of a (possibly FP8) weight: the absorbed attention needs wkv_b as a matrix."""
        raise NotImplementedError

    def absorb_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the absorbed attention's per-head projections (q_nope -> latent, latent -> v) and
        hence of the q_latent passed to `mla_attention`. The model's dtype unless the device is slow in it."""
        return dtype

    def absorb_max_queries(self, positioned: bool, dtype: torch.dtype, latent: int, nope: int, rope: int,
                           v_dim: int) -> int:
        """"auto" attention: up to this many queries per row in a step take the absorbed form; more take the naive
        one, which re-expands the cached latent through wkv_b (the whole prefix once, whatever the queries) and then
        costs less per query. `positioned`: a position step (a server's prefill chunk, a decode, a verification);
        else a prompt from a start position. A backend whose absorbed kernel is fast may take more."""
        return ABSORB_MAX_QUERIES

    # ---- ops ----------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ weight[N, K]ᵀ -> [..., N] in x's dtype."""
        raise NotImplementedError

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x * rsqrt(mean(x²) + eps) * weight, in fp32, returned in x's dtype."""
        raise NotImplementedError

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D] interleaved; cos/sin [B, S, D/2] (fp32). Returns x's dtype, dims in a fixed order."""
        raise NotImplementedError

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor
    ) -> torch.Tensor:
        """Naive MLA: q [B, S, H, Dq], k [B, T, H, Dq], v [B, T, H, Dv] -> [B, S, H, Dv]."""
        raise NotImplementedError

    def mla_attention(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        kv: torch.Tensor,
        pe: torch.Tensor,
        scale: float,
        mask: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Absorbed MLA over the latent cache.

        q_latent [B, S, H, C] (q_nope already multiplied into the latent space), q_pe [B, S, H, R],
        kv [B, T, C], pe [B, T, R] -> [B, S, H, C] = softmax(scale·(q_latent·kvᵀ + q_pe·peᵀ)) · kv.
        `rows` [B]: kv/pe are the whole slot cache [slots, T, ..] and sequence b reads slot rows[b].
        """
        raise NotImplementedError

    def linear_add(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                   residual: torch.Tensor) -> torch.Tensor:
        """residual + x Wᵀ (a residual connection, residual [..., N] in x's dtype). Composed here; a backend may add
        inside the GEMM's epilogue (one launch, one rounding)."""
        return residual + self.linear(x, weight, scale)

    def mlp(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, s1: torch.Tensor | None = None,
            s2: torch.Tensor | None = None, s3: torch.Tensor | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU w2(silu(w1 x) · w3 x) (+ residual): x [..., D] -> [..., D] in x's dtype (dense MLPs and shared
        experts). Composed of `linear` here; a backend may fuse it."""
        h = F.silu(self.linear(x, w1, s1)) * self.linear(x, w3, s3)
        return self.linear(h, w2, s2) if residual is None else self.linear_add(h, w2, s2, residual)

    def mla_latent(self, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, norm_weight: torch.Tensor,
                   eps: float, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                   rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """A position step's MLA prologue: writes rms_norm(kv) [B, S, C] and rope(k_pe) [B, S, R] into the caches
        [slots, T, C] / [slots, T, R] at (rows [B, 1], pos [B, S]) in place, and returns rope(q_pe) [B, S, H, R].
        Composed here (~6 ops); a backend may do it in one kernel."""
        kv_cache.index_put_((rows, pos), self.rms_norm(kv, norm_weight, eps))
        pe_cache.index_put_((rows, pos), self.rope(k_pe.unsqueeze(2), cos, sin).squeeze(2))
        return self.rope(q_pe, cos, sin)

    def mla_absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        w_uk: torch.Tensor,
        w_uv: torch.Tensor,
        kv: torch.Tensor,
        pe: torch.Tensor,
        scale: float,
        mask: torch.Tensor | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The absorbed form end to end: q_nope [B, S, H, N] -> latent through w_uk [H, N, C], `mla_attention`
        over the cache, back through w_uv [H, C, V] -> [B, S, H, V] in q_nope's dtype. w_uk/w_uv are in
        `absorb_dtype`. Composed here; a backend may fuse it (decode is a few hundred small ops otherwise).
        `rows` [B]: kv/pe are the whole slot cache [slots, T, ..] and sequence b reads slot rows[b] (handed on to
        `mla_attention`: a kernel reads the slots in place, the reference gathers them)."""
        B, S, H, _ = q_nope.shape
        # per head, as batched matmuls over the B·S query rows (einsum's planning costs more than the math at decode)
        q = q_nope.reshape(B * S, H, -1).transpose(0, 1).to(w_uk.dtype)  # [H, B·S, N]
        q_latent = torch.bmm(q, w_uk).transpose(0, 1).reshape(B, S, H, -1)  # [B, S, H, C]
        o = self.mla_attention(q_latent.contiguous(), q_pe.contiguous(), kv, pe, scale, mask, rows)  # [B, S, H, C]
        o = torch.bmm(o.reshape(B * S, H, -1).transpose(0, 1), w_uv)  # [H, B·S, V]
        return o.transpose(0, 1).reshape(B, S, H, -1).to(q_nope.dtype)

    def moe_gate(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: GateParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, k] fp32, ids [T, k] int64)."""
        raise NotImplementedError

    def moe_experts(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        """Σ_k weights[t, k] · SwiGLU-expert_{ids[t, k]}(x[t]) over the experts held here. x [T, D] -> [T, D]."""
        raise NotImplementedError
