"""DeepSeek-V3, top to bottom like the paper.

config -> norms / rope -> MLA -> gate -> MoE -> block -> transformer -> MTP.

The model calls only the kernel interface (`Kernels`) for arithmetic and the `Parallel`
context for collectives; it never branches on hardware. Parameters are buffers created on the
meta device and filled by `core.weights.load_weights`; names follow the official demo's layout
(`layers.3.attn.wq_b.weight`, `...ffn.experts.w1.weight` stacked over this rank's experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels import ExpertWeights, GateParams, Kernels
from .parallel import Parallel

ATTN_IMPLS = ("auto", "naive", "absorb")


# ---- building blocks: linear layers and norms -------------------------------------------
class Linear(nn.Module):
    """y = x Wᵀ through the backend. `reduce` all-reduces the output (row-parallel layers)."""

    def __init__(self, in_features: int, out_features: int, kernels: Kernels, par: Parallel | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernels, self.reduce = kernels, par
        self.register_buffer("weight", torch.empty(out_features, in_features, device="meta"))
        self.register_buffer("scale", None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x Wᵀ, or residual + x Wᵀ (the add fused into the GEMM where the backend can, never across a reduce)."""
        if self.reduce is not None and self.reduce.world_size > 1:
            y = self.reduce.all_reduce(self.kernels.linear(x, self.weight, self.scale))
            return y if residual is None else residual + y
        if residual is None:
            return self.kernels.linear(x, self.weight, self.scale)
        return self.kernels.linear_add(x, self.weight, self.scale, residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: Kernels):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.register_buffer("weight", torch.empty(dim, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


# ---- rotary embedding (YaRN) ---------------------------------------------------------------
def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the cos/sin magnitude, with YaRN whenever the config says so.

    Unlike the official demo, YaRN does not depend on the run-time context length: the model
    was trained with it, so it is always on when configured.
    """
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    y = cfg.yarn
    if y is None or y.factor <= 1:
        return freqs.float(), 1.0

    def corr(rot: float) -> float:
        return d * math.log(y.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(y.beta_fast)), 0)
    high = min(math.ceil(corr(y.beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    freqs = freqs / y.factor * (1 - smooth) + freqs * smooth

    def mscale(m: float) -> float:
        return 1.0 if y.factor <= 1 or not m else 0.1 * m * math.log(y.factor) + 1.0

    return freqs.float(), mscale(y.mscale) / mscale(y.mscale_all_dim)


@dataclass
class Step:
    """What every layer needs to know about the current forward call.

    Two kinds. A contiguous step writes all rows at start_pos.. (prefill chunks, the cache-free
    forward). A position step (`write_pos` set) is the static decode step of DESIGN.md: row b's
    tokens go to cache row rows[b] at write_pos[b, :], and it sees that row's keys 0..write_pos[b, i];
    every tensor is built on the device and every shape depends only on (B, S, span), so the step
    never waits for the host and can be captured as a graph."""

    start_pos: int
    cos: torch.Tensor  # [B, S, R/2] fp32
    sin: torch.Tensor  # [B, S, R/2] fp32
    mask: torch.Tensor | None  # [B, S, T] bool, True = may attend; None = every key visible
    span: int = 0  # position steps: cache entries 0..span-1 are read (T)
    write_pos: torch.Tensor | None = None  # [B, S] int64: cache positions of the step's tokens
    rows: torch.Tensor | None = None  # [B] int64 cache rows (slots); None = rows 0..B-1
    row_index: torch.Tensor | None = None  # [B, 1] the rows, shaped to index the cache with write_pos
    causal: bool = False  # the mask is plain causal (query start_pos + i sees keys 0..start_pos + i): a kernel may
    # use its own causal path instead of reading the mask
    _query_lens: torch.Tensor | None = field(default=None, repr=False)

    @property
    def query_lens(self) -> torch.Tensor | None:
        """[B, S] int64: keys each query sees (the mask is a prefix per query). Made on first use, once per step:
        only kernels that read a row's keys by length want it."""
        if self._query_lens is None and self.write_pos is not None:
            self._query_lens = self.write_pos + 1
        return self._query_lens

    def at(self, take: torch.Tensor, b: torch.Tensor) -> "Step":
        """This position step narrowed to one query per row, row b's take[b]-th (b: 0..B-1): what a layer runs
        whose output is read there only (a prefill's last layer, the MTP module), the other positions' latents
        having gone to the cache."""
        one = lambda t: t[b, take][:, None]  # noqa: E731  [B, 1, ...]
        return Step(self.start_pos, one(self.cos), one(self.sin), one(self.mask), span=self.span,
                    write_pos=one(self.write_pos), rows=self.rows, row_index=self.row_index)


@dataclass
class LatentCache:
    """The MLA cache: only c_kv (after kv_norm) and roped k_pe, (C + R) values per token per layer.

    Both attention forms read it; the naive form re-expands it through wkv_b each call.
    """

    kv: torch.Tensor  # [L, B, T, C]
    pe: torch.Tensor  # [L, B, T, R]

    @classmethod
    def allocate(cls, cfg: ModelConfig, layers: int, batch: int, max_len: int, dtype, device) -> "LatentCache":
        kv = torch.zeros(layers, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        pe = torch.zeros(layers, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        return cls(kv, pe)

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]


#: a layer whose output is read at one position per row (`take`) asks only that query when a row has more than
#: this many: a prefill's (chunk's) many queries, attention and wo; a verify's or catch-up's few cost less than the
#: small ops that would pick them out
NARROW_FROM = 8


# ---- multi-head latent attention ---------------------------------------------------------------
class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, par: Parallel, attn_impl: str):
        super().__init__()
        self.kernels, self.attn_impl = kernels, attn_impl
        self.n_heads = par.split(cfg.num_attention_heads, "num_attention_heads")  # heads on this rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        H, D, qk = self.n_heads, cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = Linear(D, H * qk, kernels)
        else:
            self.wq_a = Linear(D, cfg.q_lora_rank, kernels)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, kernels)
            self.wq_b = Linear(cfg.q_lora_rank, H * qk, kernels)
        self.wkv_a = Linear(D, self.latent + self.rope_dim, kernels)
        self.kv_norm = RMSNorm(self.latent, cfg.rms_norm_eps, kernels)
        self.wkv_b = Linear(self.latent, H * (self.nope + self.v_dim), kernels)
        self.wo = Linear(H * self.v_dim, D, kernels, par)
        self._absorbed: tuple[torch.Tensor, torch.Tensor] | None = None

    def absorbed(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_b split for the absorbed form, dequantized once: W_uk [H, nope, C] takes q_nope into the
        latent space, W_uvᵀ [H, C, v] takes the attended latent to the value space."""
        if self._absorbed is None or self._absorbed[0].dtype != dtype:
            w = self.kernels.weight_dequant(self.wkv_b.weight, self.wkv_b.scale, dtype)
            w = w.view(self.n_heads, self.nope + self.v_dim, self.latent)  # [H, nope + v, C]
            self._absorbed = (w[:, : self.nope].contiguous(), w[:, self.nope:].transpose(1, 2).contiguous())
        return self._absorbed

    def forward(self, x: torch.Tensor, step: Step, kv_cache: torch.Tensor | None, pe_cache: torch.Tensor | None,
                residual: torch.Tensor | None = None, take: torch.Tensor | None = None):
        """x [B, S, D] -> [B, S, D] (+ residual); with `take` [B] (a position step's query per row) -> [B, 1, D]:
        every position writes its latent, only row b's take[b]-th queries the cache (the queries, attention and
        wo of the others would be thrown away)."""
        B, S, _ = x.shape
        kv, k_pe = self.wkv_a(x).split([self.latent, self.rope_dim], dim=-1)  # [B, S, C], [B, S, R]
        if take is not None and S == 1:
            take = None  # the one position there is: nothing to pick (a decode step read at its token)
        b = torch.arange(B, device=x.device) if take is not None else None
        narrow = take is not None and S > NARROW_FROM
        if narrow:
            if kv_cache is None or step.write_pos is None or residual is None:
                raise ValueError("MLA: `take` needs a position step over a cache, and the residual")
            # mla_latent ropes a query beside the latents it writes: k_pe stands in as a one-head query, dropped
            self.kernels.mla_latent(k_pe.unsqueeze(2), kv, k_pe, self.kv_norm.weight, self.kv_norm.eps, step.cos,
                                    step.sin, kv_cache, pe_cache, step.row_index, step.write_pos)
            x, residual, S = x[b, take][:, None], residual[b, take][:, None], 1  # [B, 1, D]
            step = step.at(take, b)
            self.kernels.begin_step(step)  # a step of its own: the ops' tables are its positions'
        if hasattr(self, "wq"):
            q = self.wq(x)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, self.n_heads, self.nope + self.rope_dim)  # [B, S, H, nope + R]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        if kv_cache is None or step.write_pos is None:
            q_pe = self.kernels.rope(q_pe, step.cos, step.sin)
            kv = self.kv_norm(kv)
            k_pe = self.kernels.rope(k_pe.unsqueeze(2), step.cos, step.sin).squeeze(2)
        if kv_cache is not None and step.write_pos is None:
            end = step.start_pos + S
            kv_cache[:B, step.start_pos:end] = kv
            pe_cache[:B, step.start_pos:end] = k_pe
            kv, k_pe = kv_cache[:B, :end], pe_cache[:B, :end]  # [B, T, C], [B, T, R]
        impl = self.attn_impl
        if impl == "auto":  # decode and draft verification absorbed; a prefill as the backend finds cheaper
            most = self.kernels.absorb_max_queries(step.write_pos is not None, x.dtype, self.latent, self.nope,
                                                   self.rope_dim, self.v_dim)
            impl = "naive" if S > most else "absorb"
        slots = None  # the absorbed form of a step over slots anywhere in the cache reads the whole cache by slot
        if kv_cache is not None and step.write_pos is not None:  # a position step: normed kv and roped k_pe
            q_pe = (self.kernels.rope(q_pe, step.cos, step.sin) if narrow else  # the latents are written
                    self.kernels.mla_latent(q_pe, kv, k_pe, self.kv_norm.weight, self.kv_norm.eps, step.cos,
                                            step.sin, kv_cache, pe_cache, step.row_index,
                                            step.write_pos))  # scattered in
            if step.rows is None:
                kv, k_pe = kv_cache[:B, :step.span], pe_cache[:B, :step.span]  # [B, span, C], [B, span, R]
            elif impl == "absorb":
                kv, k_pe, slots = kv_cache[:, :step.span], pe_cache[:, :step.span], step.rows  # [slots, span, ..]
            else:  # slots anywhere in the cache: gathered for the naive form's expansion
                kv, k_pe = kv_cache[step.rows, :step.span], pe_cache[step.rows, :step.span]

        if impl == "naive":
            kvb = self.wkv_b(kv).view(B, -1, self.n_heads, self.nope + self.v_dim)  # [B, T, H, nope + v]
            k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
            o = self.kernels.attention(torch.cat([q_nope, q_pe], dim=-1), k, v, self.scale, step.mask)
        else:
            w_uk, w_uv = self.absorbed(self.kernels.absorb_dtype(x.dtype))  # [H, nope, C], [H, C, v]
            o = self.kernels.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, k_pe, self.scale, step.mask, slots)  # [B, S, H, v]
        out = self.wo(o.flatten(2), residual)  # [B, S, D]
        return out[b, take][:, None] if take is not None and not narrow else out


# ---- feed-forward: dense MLP, gate, MoE ----------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x). Split over ranks; `reduce=False` leaves the sum to the caller."""

    def __init__(self, dim: int, inter: int, kernels: Kernels, par: Parallel, reduce: bool = True):
        super().__init__()
        inter = par.split(inter, "intermediate_size")
        self.kernels, self.reduce = kernels, par if reduce else None
        self.w1, self.w2, self.w3 = Linear(dim, inter, kernels), Linear(inter, dim, kernels), Linear(dim, inter, kernels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU(x) (+ residual: added inside where the backend can, never across a reduce)."""
        w1, w2, w3 = self.w1, self.w2, self.w3
        weights = (w1.weight, w2.weight, w3.weight, w1.scale, w2.scale, w3.scale)
        if self.reduce is not None and self.reduce.world_size > 1:
            y = self.reduce.all_reduce(self.kernels.mlp(x, *weights))
            return y if residual is None else residual + y
        return self.kernels.mlp(x, *weights, residual=residual)


class Gate(nn.Module):
    """Aux-loss-free, group-limited routing (replicated on every rank). Weights kept in fp32."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        group_score = {"noaux_tc": "top2_sum", "group_limited_greedy": "max", "greedy": "none"}[cfg.topk_method]
        self.params = GateParams(
            top_k=cfg.num_experts_per_tok,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            scoring_func=cfg.scoring_func,
            group_score=group_score,
            norm_topk_prob=cfg.norm_topk_prob,
            route_scale=cfg.routed_scaling_factor,
        )
        self.register_buffer("weight", torch.empty(cfg.n_routed_experts, cfg.hidden_size, device="meta"))
        self.register_buffer("bias", torch.empty(cfg.n_routed_experts, device="meta") if cfg.topk_method == "noaux_tc" else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.moe_gate(x, self.weight, self.bias, self.params)  # [T, k] fp32, [T, k] int64


class StackedLinear(nn.Module):
    """One projection of all local experts: weight [E, out, in] (+ scale [E, ceil(out/128), ceil(in/128)])."""

    def __init__(self, first: int, n: int, in_features: int, out_features: int):
        super().__init__()
        self.first, self.count = first, n  # global ids first .. first + n - 1
        self.register_buffer("weight", torch.empty(n, out_features, in_features, device="meta"))
        self.register_buffer("scale", None)


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallel):
        super().__init__()
        n = par.split(cfg.n_routed_experts, "n_routed_experts")
        self.first = par.rank * n  # expert e lives on rank e // n, as in the official layout
        self.total = cfg.n_routed_experts
        D, inter = cfg.hidden_size, cfg.moe_intermediate_size
        self.w1, self.w2, self.w3 = (StackedLinear(self.first, n, D, inter), StackedLinear(self.first, n, inter, D),
                                     StackedLinear(self.first, n, D, inter))

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w1.weight, self.w2.weight, self.w3.weight,
                             self.w1.scale, self.w2.scale, self.w3.scale, first=self.first, total=self.total)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, par: Parallel):
        super().__init__()
        self.kernels, self.par = kernels, par
        self.gate = Gate(cfg, kernels)
        self.experts = Experts(cfg, par)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, kernels, par, reduce=False)
            if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        weights, ids = self.gate(x)
        y = self.kernels.moe_experts(x, weights, ids, self.experts.weights())
        if self.shared_experts is not None:
            y = self.shared_experts(x, residual=y)  # routed + shared: partial sums on every rank
        y = self.par.all_reduce(y).view(shape)  # one reduce for both
        return y if residual is None else residual + y


# ---- decoder block and the transformer -----------------------------------------------------------
class Block(nn.Module):
    def __init__(self, layer: int, cfg: ModelConfig, kernels: Kernels, par: Parallel, attn_impl: str):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.attn = MLA(cfg, kernels, par, attn_impl)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.ffn = MoE(cfg, kernels, par) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size, kernels, par)

    def forward(self, x, step: Step, kv_cache=None, pe_cache=None, take: torch.Tensor | None = None):
        """x [B, S, D] -> [B, S, D]; with `take` [B] (a position per row, a position step) only that position goes
        through attention's query side and the feed-forward -> [B, 1, D]: the others only had to leave their
        latents in the cache (a prefill's last layer, the MTP module)."""
        x = self.attn(self.attn_norm(x), step, kv_cache, pe_cache, residual=x, take=take)  # x + attn(norm(x))
        return self.ffn(self.ffn_norm(x), residual=x)  # x + ffn(norm(x))


class ParallelEmbedding(nn.Module):
    """Vocabulary split over ranks: each looks up its rows, zeros the rest, then all ranks sum."""

    def __init__(self, vocab: int, dim: int, par: Parallel):
        super().__init__()
        self.par = par
        n = par.split(vocab, "vocab_size")
        self.lo, self.hi = par.rank * n, (par.rank + 1) * n
        self.register_buffer("weight", torch.empty(n, dim, device="meta"))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.par.world_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.lo) | (tokens >= self.hi)
        y = F.embedding((tokens - self.lo).masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside[..., None], 0)
        return self.par.all_reduce(y)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, par: Parallel, attn_impl: str = "auto",
                 max_seq_len: int = 4096, with_mtp: bool = True):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r}; expected one of {ATTN_IMPLS}")
        self.cfg, self.kernels, self.par, self.max_seq_len = cfg, kernels, par, max_seq_len
        self.embed = ParallelEmbedding(cfg.vocab_size, cfg.hidden_size, par)
        self.layers = nn.ModuleList(Block(i, cfg, kernels, par, attn_impl) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.head = Linear(cfg.hidden_size, par.split(cfg.vocab_size, "vocab_size"), kernels)
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTP(cfg.num_hidden_layers + j, cfg, kernels, par, attn_impl) for j in range(n_mtp))
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self._aranges: dict[int, torch.Tensor] = {}

    def build_rope(self, device) -> None:
        """cos/sin tables [max_seq_len, R/2]: computed, never loaded, so built on the real device."""
        inv_freq, magnitude = rope_frequencies(self.cfg)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device="cpu"), inv_freq)
        self.rope_cos = (angles.cos() * magnitude).to(device)
        self.rope_sin = (angles.sin() * magnitude).to(device)
        self._aranges = {}

    def set_attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={impl!r}; expected one of {ATTN_IMPLS}")
        for m in self.modules():
            if isinstance(m, MLA):
                m.attn_impl = impl

    def _arange(self, n: int) -> torch.Tensor:
        """0..n-1 on the model's device, made once per n: a decode step launches no kernel for it."""
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n, device=self.rope_cos.device)
        return self._aranges[n]

    def position_step(self, positions: torch.Tensor, q: int, span: int, rows: torch.Tensor | None = None) -> Step:
        """The static step: row b's q tokens sit at positions[b] .. positions[b] + q - 1 of its cache row
        (rows[b], or b) and see that row's keys up to their own position. Built on the device from
        `positions`; shapes depend on (B, q, span) only."""
        B = positions.shape[0]
        pos = positions[:, None] if q == 1 else positions[:, None] + self._arange(q)  # [B, q]
        mask = self._arange(span)[None, None, :] <= pos[..., None]  # [B, q, span]
        row_index = (rows if rows is not None else self._arange(B))[:, None]  # [B, 1]
        step = Step(0, self.rope_cos[pos], self.rope_sin[pos], mask, span=span, write_pos=pos,
                    rows=rows, row_index=row_index)
        self.kernels.begin_step(step)
        return step

    def forward_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: "LatentCache", span: int,
                     rows: torch.Tensor | None = None, take: torch.Tensor | None = None, all_hidden: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One position step (see Step): tokens [B, q] at positions [B] -> (logits fp32, final hidden).
        With `take` [B] (an index into q per row) only those positions: logits [B, V], hidden [B, D] (or every
        position's hidden [B, q, D] with `all_hidden`: what the MTP drafter reads after a prefill);
        else all: [B, q, V], [B, q, D]. q = 1 decodes, q = 1 + k verifies k drafts, a large q prefills."""
        B, q = tokens.shape
        step = self.position_step(positions, q, span, rows)
        h = self.embed(tokens)  # [B, q, D]
        last, only = len(self.layers) - 1, None if all_hidden else take  # the last layer's output read at take only
        for i, layer in enumerate(self.layers):
            h = layer(h, step, cache.kv[i], cache.pe[i], take=only if i == last else None)
        if take is None:
            h = self.norm(h)
            return self.logits(h), h
        if all_hidden:
            h = self.norm(h)
            return self.logits(h[torch.arange(B, device=h.device), take]), h
        h = self.norm(h[:, 0])  # [B, D]: the last layer ran at take only, what is sampled
        return self.logits(h), h

    def mtp_step(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, cache: "LatentCache",
                 span: int, take: torch.Tensor | None, j: int = 0, rows: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module j as a position step over its own cache (one layer; cache rows `rows`, as forward_step's):
        position t pairs the main model's final hidden at t (hidden [B, q, D]) with the token after t (tokens
        [B, q]) and drafts the token after that. Returns the draft logits [B, V] at `take` and the block's output
        there [B, D] (the hidden that chains a further draft through the same module); `take` None: at every
        position, [B, q, V] and [B, q, D] (the drafts a run of probes would have made, scored at once)."""
        q = tokens.shape[1]
        mtp = self.mtp[j]
        step = self.position_step(positions, q, span, rows)
        x = mtp.eh_proj(torch.cat([mtp.enorm(self.embed(tokens)), mtp.hnorm(hidden)], dim=-1))  # [B, q, D]
        x = mtp.block(x, step, cache.kv[0], cache.pe[0], take=take)  # [B, 1, D]: the feed-forward at take only
        if take is not None:
            x = x[:, 0]  # [B, D]
        return self.logits(mtp.head_norm(x)), x

    def step(self, batch: int, seqlen: int, start_pos: int, pad: torch.Tensor | None) -> Step:
        """Rope angles and the causal mask for queries at start_pos..start_pos+seqlen-1.

        `pad` [B] counts left-padding tokens per sequence: padded positions are invisible and
        each sequence's rope positions start at 0 at its first real token, so a batch of
        prompts of different lengths computes what each prompt would alone.
        """
        end = start_pos + seqlen
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len={self.max_seq_len}")
        device = self.rope_cos.device
        q_pos = torch.arange(start_pos, end, device=device)  # [S]
        k_pos = torch.arange(end, device=device)  # [T]
        causal = k_pos[None, :] <= q_pos[:, None]  # [S, T]
        if pad is None:
            mask = None if seqlen == 1 else causal[None].expand(batch, -1, -1)
            pos = q_pos[None].expand(batch, -1)
        else:
            pad = pad.to(device)
            real = k_pos[None, :] >= pad[:, None]  # [B, T]
            diag = k_pos[None, :] == q_pos[:, None]  # a pad query sees itself: no all-masked rows
            mask = causal[None] & (real[:, None, :] | diag[None])
            pos = (q_pos[None, :] - pad[:, None]).clamp(min=0)
        step = Step(start_pos, self.rope_cos[pos], self.rope_sin[pos], mask, causal=pad is None)
        self.kernels.begin_step(step)
        return step

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0, cache: LatentCache | None = None,
               pad: torch.Tensor | None = None) -> tuple[torch.Tensor, Step]:
        """Final-normed hidden states [B, S, D] for tokens [B, S] placed at start_pos."""
        B, S = tokens.shape
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs a cache holding the earlier positions")
        step = self.step(B, S, start_pos, pad)
        h = self.embed(tokens)  # [B, S, D]
        for i, layer in enumerate(self.layers):
            if cache is None:
                h = layer(h, step)
            else:
                h = layer(h, step, cache.kv[i], cache.pe[i])
        return self.norm(h), step

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.par.all_gather_last(self.kernels.linear(h, self.head.weight, self.head.scale)).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: LatentCache | None = None,
                pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V] (fp32) for tokens [B, S]; with a cache, prefill may continue at any start_pos."""
        h, _ = self.hidden(tokens, start_pos, cache, pad)
        return self.logits(h[:, -1:] if last_only else h)


# ---- multi-token prediction --------------------------------------------------------------------------
class MTP(nn.Module):
    """The MTP module (checkpoint layer num_hidden_layers + j): drafts token t+2 at position t.

    e = enorm(embed(token[t+1])), h = hnorm(main final hidden[t]), x = eh_proj([e; h]),
    x = block(x) with its own cache layer, logits = head(shared_head.norm(x)). The embedding and
    the output head are the main model's (the checkpoint's copies are identical and skipped).
    """

    def __init__(self, layer: int, cfg: ModelConfig, kernels: Kernels, par: Parallel, attn_impl: str):
        super().__init__()
        self.layer = layer
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, kernels)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, kernels)
        self.eh_proj = Linear(2 * D, D, kernels)
        self.block = Block(layer, cfg, kernels, par, attn_impl)
        self.head_norm = RMSNorm(D, cfg.rms_norm_eps, kernels)

    @torch.inference_mode()
    def forward(self, model: Transformer, next_tokens: torch.Tensor, hidden: torch.Tensor, step: Step,
                kv_cache: torch.Tensor | None = None, pe_cache: torch.Tensor | None = None) -> torch.Tensor:
        e = self.enorm(model.embed(next_tokens))  # [B, S, D]
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))  # embedding first
        x = self.block(x, step, kv_cache, pe_cache)
        return model.logits(self.head_norm(x))  # [B, S, V]
