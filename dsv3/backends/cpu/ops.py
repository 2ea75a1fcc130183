"""The cpu backend: the plain-torch reference plus CPU speed rules, tested against the reference.

What it adds: the C kernels of csrc/ for decode-sized work (fewer than UPCAST_ROWS rows; AMX tiles
from AMX_DECODE_ROWS rows where the CPU has them), FP8
weights kept as FP8 (`weights="fp8"`, the default where the C kernels run a bf16 model: half the
memory and half the bytes per token of bf16) or dequantized at load ("bf16"), torch's own GEMMs
(oneDNN, AMX where the CPU has it) for prefill with FP8 weights widened per call, fp32 GEMMs for bf16
prefill on CPUs without bf16 instructions, flash attention (SDPA) for prefill, and a rope rotation
derived once per step. Without a C compiler (or with DSV3_CPU_NATIVE=0) every op that has no dtype
rule is the reference's and FP8 weights are dequantized at load.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ...core.errors import CheckpointError, DsvError
from ...core.fp8 import is_fp8, scale_shape
from ...core.kernels import ExpertWeights, GateParams
from ..reference import ReferenceKernels
from . import native as native_lib
from . import tape as tape_lib

log = logging.getLogger("dsv3")
#: what FP8 checkpoint weights become in memory on this backend
WEIGHT_MODES = ("auto", "fp8", "bf16")


def _native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Private torch probes, so no if absent."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


#: from this many rows, a bf16 GEMM on a CPU without bf16 instructions is faster done in fp32
#: (there it runs row by row; converting the weight costs about 12 rows' worth, measured on AVX2).
#: Below it, products are GEMVs: memory-bound, and the native kernels' job.
UPCAST_ROWS = 16
#: where the C kernels multiply on AVX512-BF16 pair dot products (native.bf16dot: no AMX, or rows below
#: AMX_DECODE_ROWS), linears and dense MLPs of fewer than this many rows run there rather than through torch: a
#: decode step of batch 16 too. Measured on an AMD EPYC (Zen 4), 2 threads, C / torch time (torch's GEMM of the FP8
#: weight widened per call, or of the bf16 weight) at 16 and 24 rows: FP8 linears 2048 x 1024 0.77x, 1.06x; 7168 x
#: 2048 0.61x, 1.32x; the bf16 head 32000 x 1024 0.67x, 0.99x; FP8 SwiGLU MLPs 1024 x 256 0.67x, 0.96x; 1024 x 2816
#: 0.82x, 1.20x.
BF16DOT_ROWS = 17
#: up to this many (token, expert) routes the C kernel runs the routed experts (each expert's weights read once,
#: its rows dotted in registers); beyond, one GEMM per expert through torch. Measured on 32 experts of 256 x 1024,
#: FP8, AVX-512/AMX: 128 tokens x top-4 take 11 ms in C vs 18-23 ms as 32 torch GEMMs; 512 tokens 61 vs 31 ms.
NATIVE_MOE_ROUTES = 512
#: where the CPU has AMX tiles, from this many routes per routed expert on average the routed experts run on them
#: (native.moe_amx: each weight strip widened to bf16 once and multiplied into 32 rows a tile pass) rather than in
#: the C kernel above, whose fp32 dot products cost the same per row however many rows share a weight. Measured on an
#: AMX Xeon, 2 threads, FP8, C kernel / AMX time at 2 and 3 routes per expert: 32 experts of 1024 x 256,
#: top-4: 0.88x, 1.26x; 256 of 1024 x 320, top-8: 1.00x (2), 1.64x (4); 32 of 7168 x 2048, top-8: 0.89x, 1.06x.
AMX_ROUTES_PER_EXPERT = 2.5
#: where the CPU has AMX tiles, linears and dense MLPs from this many rows to the decode limit (BF16DOT_ROWS - 1) run
#: on them with the C kernels' arithmetic (native.linear_amx / mlp_amx: exact products, fp32 sums per FP8 block): an
#: AMX Xeon issues an AVX512-BF16 pair dot product about once per 3 cycles, so the C kernel's cost per weight grows
#: with the rows, where a tile product costs the same for 1-16 and only the widening of each weight remains.
#: Measured on a 2-core AMX Xeon, 2 threads, FP8, C kernel / tiles time, each call repeated: linears 384-8192 x
#: 384-7168 (and the 8192 x 1024 bf16 head) at 1 row 0.67-1.0x, 2 rows 0.86-1.26x, 4 rows 1.3-1.7x; SwiGLU MLPs
#: 1024 x 320 / 2816 and 7168 x 2048 at 2 rows 1.0-1.2x, 4 rows 1.6-1.8x, 16 rows 3.6-4.1x. Inside a decode step,
#: between the other kernels, tiles do less well (the verify step of 2 tokens ran 6% slower on them): greedy decode
#: tokens/s, tiles / C kernel, BENCH_280M batch 2 1.00x, 4 1.08x, 8 1.24x, 16 1.42x; V3_SHAPED 0.96x, 1.03x, 1.11x,
#: 1.18x (its routed experts, most of its bytes, take one row each and stay on the C kernel). From 5 rows, not 4:
#: the gain at 4 is small, and the two kernels sum in different orders, so the step of a batch of 3 (eager: 3 rows)
#: and its bucket of 4 (recorded: 4 rows) would give different bits; batches of 5-8 and their bucket of 8 all take
#: tiles, where a row's bits do not depend on the rows beside it.
AMX_DECODE_ROWS = 5
#: from this many rows (past the decode kernels') a linear or a dense MLP runs on the AMX grouped GEMM (one expert),
#: which widens each weight strip once for up to 32 rows a tile pass and rounds as the reference does. Below it
#: linear_amx is faster (measured as above, grouped / linear_amx time at 5-16 rows: 1.0-1.9x).
AMX_ROWS = BF16DOT_ROWS
#: up to this many rows, a prompt's linears and dense MLPs run on the AMX grouped GEMMs (one expert) rather than
#: through torch's oneDNN GEMM of the weight widened per call. Measured in the 280M model's prefill, FP8, 2 threads
#: (linears + linear_add / dense and shared MLPs, ms): 512 tokens 18.4 vs 21.4 / 14.7 vs 20.4; 1024 tokens 33.7 vs
#: 28.6 / 27.7 vs 32.7; 2048 tokens 72.5 vs 42.6 / 61.8 vs 47.7.
AMX_PROMPT_ROWS = 512
#: the C attention kernel's cost per multiply-add over torch's GEMMs in the naive form (absorb_max_queries). Fitted
#: on an AMD EPYC (Zen 5, avx512bf16 build), 2 threads, prefill chunks over 2048 cached tokens, naive / absorbed time
#: of a chunk: V3's attention dims 64 queries 1.5x, 128 queries 1.14x; the 280M model (8 heads) at 64 about 1.0x.
ABSORB_COST = 1.25


class CpuKernels(ReferenceKernels):
    name = "cpu"
    device_type = "cpu"
    fp8_dtype = None
    dist_backend = "gloo"
    fp8_split_dequantizes = True

    def __init__(self, device=None, weights: str = "auto", isa: str | None = None):
        super().__init__(device)
        self.native_bf16 = _native_bf16()
        self.native = native_lib.load(isa) if self.device.type == "cpu" else None
        self.use_weights(weights)
        self._routes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (ids, alpha) per row count: see _mlp_routes
        self._one_group: dict[int, torch.Tensor] = {}  # grouped_amx's starts of one expert, per row count
        self.model_dtype: torch.dtype | None = None  # seen at load (prepare_linear): the step is recorded for bf16

    @classmethod
    def available(cls) -> tuple[bool, str]:
        lib = native_lib.load()
        decode = (f"bf16 models keep FP8 weights as FP8 and decode through its C kernels ({lib.isa}), the step "
                  "recorded and replayed" if lib is not None else
                  "FP8 weights dequantized at load, decode in plain torch (C kernels off: no compiler, build failed "
                  "or DSV3_CPU_NATIVE=0)")
        return True, f"always usable (BF16 or FP32); {decode}"

    def describe(self) -> str:
        fp8 = str(self.fp8_dtype).replace("torch.", "") if self.fp8_dtype else "none (dequantized at load)"
        isa = "no C kernels" if self.native is None else (
            f"C kernels: {self.native.isa}{' + vbmi' if self.native.fp8_table else ''}")
        return f"{self.name} on {self.device}, fp8 weights: {fp8}, {isa}"

    # ---- the recorded decode step ------------------------------------------------------------
    def capture_unavailable(self) -> str | None:
        if self.native is None or self.device.type != "cpu" or self.model_dtype != torch.bfloat16:
            return ("the cpu backend records and replays the decode step only for bf16 models on its C kernels; this "
                    "one runs each step eagerly (no graph capture)")
        return None

    def capture(self, fn):
        """The decode step recorded once and replayed (tape.py): its C calls and computing torch ops in order, none of
        the Python around them. None (the caller runs it eagerly) where the step reads a tensor on the host."""
        if self.capture_unavailable() is not None:
            return None
        fn()  # a warm-up: what the first step makes lazily (the absorbed projections) exists before the recording
        try:
            tape, out = tape_lib.record(fn, self.native)
            tape_lib.check(tape, out)
        except tape_lib.Uncapturable as e:
            log.info("cpu: the decode step cannot be recorded (%s); it runs eagerly", e)
            return None
        return tape.replay, out

    # ---- load time ----------------------------------------------------------------------
    def use_weights(self, weights: str) -> None:
        """"fp8": FP8 checkpoint weights stay FP8 (the C kernels widen them); "bf16": dequantized at load; "auto": fp8
        where it can (a bf16 model with the C kernels built), else bf16. Set before the weights load."""
        if weights not in WEIGHT_MODES:
            raise DsvError(f"cpu weights {weights!r}: expected one of {', '.join(WEIGHT_MODES)}")
        self.weights = weights

    def keeps_fp8(self, dtype: torch.dtype) -> bool:
        """Do FP8 checkpoint weights stay FP8 for a model in `dtype`? (the C kernels take bf16 activations)"""
        able = self.native is not None and dtype == torch.bfloat16 and self.device.type == "cpu"
        if self.weights == "fp8" and not able:
            why = "the C kernels did not build here" if self.native is None else f"the model runs in {dtype}"
            raise DsvError(f"cpu weights fp8: {why}; FP8-resident weights need the C kernels and --dtype bf16 "
                           "(or use --cpu-weights bf16)")
        return able and self.weights != "bf16"

    def prepare_linear(self, weight, scale, dtype):
        self.model_dtype = dtype
        if (scale is not None and is_fp8(weight.dtype) and self.keeps_fp8(dtype)
                and tuple(scale.shape) == scale_shape(weight.shape)):
            w = weight.contiguous()
            if nan := self.native.count_nan(w):
                raise CheckpointError(f"an FP8 weight {list(weight.shape)} holds {nan} NaN values: the checkpoint is "
                                      "corrupt (check it with `dsv3 convert verify CKPT`)")
            self.fp8_dtype = weight.dtype
            return w, scale.float().contiguous()
        return super().prepare_linear(weight, scale, dtype)

    def weight_dequant(self, weight, scale, dtype):
        if scale is not None and self.native is not None and weight.device.type == "cpu":
            return native_lib.dequantize(weight, scale, dtype)  # the same bits in one C pass (~6x torch's cast)
        return super().weight_dequant(weight, scale, dtype)

    def slow_bf16(self, dtype: torch.dtype) -> bool:
        """bf16 matmuls here run row by row (a CPU without bf16 instructions): fp32 is faster."""
        return dtype == torch.bfloat16 and self.device.type == "cpu" and not self.native_bf16

    def absorb_max_queries(self, positioned, dtype, latent, nope, rope, v_dim):
        # A position step in bf16 runs the absorbed form in one C call (mla_absorbed) for any number of queries. Per
        # cached key the naive form expands the latent (latent * (nope + v) MACs a head) then costs nope + rope + v
        # a query; the absorbed form costs 2 latent + rope a query, at ABSORB_COST times torch's cost per MAC. So
        # below the crossing a prefill chunk is cheaper absorbed (V3's dims: ~125 queries; at 64, 1.5x on a chunk
        # over 2048 cached tokens, measured).
        most = super().absorb_max_queries(positioned, dtype, latent, nope, rope, v_dim)
        if not positioned or dtype != torch.bfloat16 or self.native is None or self.native.isa == "amx":
            # AMX: torch's GEMMs run on tiles, so the naive form's expansion is cheap. Measured on an AMX Xeon, 2
            # threads, chunks over 2048 cached tokens, naive / absorbed time: V3's attention dims (16 heads) 1.25x at
            # 16 queries, 0.92x at 32, 0.65x at 64; the 280M model 0.97x at 16, 0.83x at 32: chunks stay naive
            return most
        per_query = ABSORB_COST * (2 * latent + rope) - (nope + rope + v_dim)
        return max(most, int(latent * (nope + v_dim) / per_query)) if per_query > 0 else most

    def absorb_dtype(self, dtype):
        # a bf16 bmm of one query row per head runs ~9x slower than fp32 on such CPUs (the C kernel takes both)
        return torch.float32 if self.slow_bf16(dtype) else dtype

    def _dense(self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """A weight as a dense matrix in dtype for a prefill GEMM (FP8 widened now, dropped after the call)."""
        if scale is None:
            return weight
        if dtype == torch.bfloat16 and self.native is not None and weight.dim() == 2:
            return self.native.fp8_to_bf16(weight, scale)
        return self.weight_dequant(weight, scale, dtype)

    # ---- ops ----------------------------------------------------------------------------
    def _native_ok(self, x, *weights) -> bool:
        """x bf16 and every weight bf16 or (kept) FP8, contiguous, on the CPU, with the C kernels built."""
        if self.native is None or x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return False
        for w in weights:
            if (w.dtype != torch.bfloat16 and w.dtype != self.fp8_dtype) or not w.is_contiguous():
                return False
        return True

    def _decode_rows(self, x) -> int:
        """x's rows where its linears and dense MLPs take the C kernels (decode-sized), else 0."""
        rows = x.numel() // x.shape[-1]
        limit = BF16DOT_ROWS if self.native is not None and self.native.bf16dot else UPCAST_ROWS
        return rows if rows < limit else 0

    def linear(self, x, weight, scale=None):
        return self._linear(x, weight, scale, None)

    def linear_add(self, x, weight, scale, residual):
        return self._linear(x, weight, scale, residual)

    def _linear(self, x, weight, scale, residual):
        rows = self._decode_rows(x)
        if self._amx_decode(rows, x, weight) and (residual is None or residual.dtype == torch.bfloat16):
            y = self.native.linear_amx(x.reshape(rows, -1).contiguous(), weight, scale,
                                       None if residual is None else residual.reshape(rows, -1).contiguous())
            if y is not None:
                return y.view(*x.shape[:-1], weight.shape[0])
        if self._amx_rows(x, weight) and (residual is None or residual.dtype == x.dtype):
            T = x.numel() // x.shape[-1]
            y = self.native.grouped_amx(x.reshape(T, -1).contiguous(), self._starts(T), weight[None],
                                        None if scale is None else scale[None], total=T)
            if y is not None:
                y = y.view(*x.shape[:-1], weight.shape[0])
                return y if residual is None else residual + y
        if rows and self._native_ok(x, weight) and (residual is None or residual.dtype == torch.bfloat16):
            # fp32 accumulation and one rounding to bf16 (residual added before it); the weight read once
            y = self.native.linear(x.reshape(rows, -1).contiguous(), weight, scale,
                                   None if residual is None else residual.reshape(rows, -1).contiguous())
            return y.view(*x.shape[:-1], weight.shape[0])
        w = self._dense(weight, scale, x.dtype)
        if self.slow_bf16(x.dtype) and not rows:
            # same result (fp32 accumulation, one rounding to bf16), ~8x faster on AVX2 for prefill
            y = F.linear(x.float(), w.float()).to(x.dtype)
        else:
            y = F.linear(x, w.to(x.dtype))
        return y if residual is None else residual + y

    def mlp(self, x, w1, w2, w3, s1=None, s2=None, s3=None, residual=None):
        rows = self._decode_rows(x)
        if self._amx_decode(rows, x, w1, w2, w3) and (residual is None or residual.dtype == torch.bfloat16):
            y = self.native.mlp_amx(x.reshape(rows, -1).contiguous(), w1, w3, w2, s1, s3, s2,
                                    None if residual is None else residual.reshape(rows, -1).contiguous())
            if y is not None:
                return y.view(x.shape)
        if self._amx_rows(x, w1, w2, w3) and (residual is None or residual.dtype == x.dtype):
            y = self._mlp_amx(x, w1, w2, w3, s1, s2, s3)
            if y is not None:
                return y if residual is None else residual + y
        if rows and self._native_ok(x, w1, w2, w3) and (residual is None or residual.dtype == torch.bfloat16):
            ids, alpha = self._mlp_routes(rows)
            y = self.native.moe(x.reshape(rows, -1).contiguous(), ids, alpha, w1, w3, w2, s1, s3, s2,
                                residual=None if residual is None else residual.reshape(rows, -1).contiguous())
            return y.view(x.shape)
        return super().mlp(x, w1, w2, w3, s1, s2, s3, residual)

    def _mlp_routes(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [rows, 1] zeros, alpha [rows, 1] ones): a dense MLP as the one expert of dsv3_moe. Made once per row
        count, so a recorded step holds no factory to refill at each replay."""
        if rows not in self._routes:
            self._routes[rows] = (torch.zeros(rows, 1, dtype=torch.int64), torch.ones(rows, 1))
        return self._routes[rows]

    def _starts(self, T: int) -> torch.Tensor:
        """grouped_amx's starts for T rows of one expert, made once per row count (a recorded step refills no factory)."""
        if T not in self._one_group:
            self._one_group[T] = torch.tensor([0, T])
        return self._one_group[T]

    def _amx_decode(self, rows: int, x, *weights) -> bool:
        """A decode-sized product (rows from _decode_rows) goes to linear_amx / mlp_amx: AMX here, AMX_DECODE_ROWS
        rows or more, bf16 activations, bf16 or kept-FP8 2-D weights whose K (and an MLP's hidden width) are
        multiples of 32."""
        return (rows >= AMX_DECODE_ROWS and self.native is not None and self.native.amx and x.shape[-1] % 32 == 0
                and self._native_ok(x, *weights) and all(w.dim() == 2 for w in weights)
                and (len(weights) == 1 or weights[0].shape[0] % 32 == 0))

    def _amx_rows(self, x, *weights) -> bool:
        """A product [T, K] x [N, K]ᵀ goes to the AMX grouped GEMM (one expert): AMX here, AMX_ROWS to AMX_PROMPT_ROWS
        rows, bf16 activations, bf16 or kept-FP8 weights, K and N multiples of 32."""
        return (self.native is not None and self.native.amx and AMX_ROWS <= x.numel() // x.shape[-1] <= AMX_PROMPT_ROWS
                and self._native_ok(x, *weights) and x.shape[-1] % 32 == 0
                and all(w.dim() == 2 and w.shape[0] % 32 == 0 for w in weights))

    def _mlp_amx(self, x, w1, w2, w3, s1, s2, s3):
        """A prompt's dense MLP or shared expert as one expert of the AMX grouped GEMMs: SwiGLU in the gate/up GEMM's
        epilogue (no [T, 2I] intermediate, no separate silu and product), FP8 weights widened inside. The reference's
        roundings. None: no AMX."""
        T = x.numel() // x.shape[-1]
        starts = self._starts(T)
        one = lambda s: None if s is None else s[None]  # noqa: E731  an expert stack of one
        h = self.native.grouped_amx(x.reshape(T, -1).contiguous(), starts, w1[None], one(s1), w3[None], one(s3),
                                    total=T)
        if h is None:
            return None
        return self.native.grouped_amx(h, starts, w2[None], one(s2), total=T).view(x.shape)

    def rms_norm(self, x, weight, eps):
        if native_lib.rows_at_one_stride(x) and self._native_ok(x, weight):
            return self.native.rms_norm_bf16(x, weight, eps)  # F.rms_norm runs ~8 ops over a bf16 row
        return super().rms_norm(x, weight, eps)

    def rope(self, x, cos, sin):
        B, S = x.shape[:2]
        if (self._native_ok(x) and x.stride(-1) == 1 and x.stride(0) == S * x.stride(1)
                and cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32):
            return self.native.rope_bf16(x, cos, sin)
        z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, S, H, D/2] pairs as complex
        rot = self.step_table("rotation", (cos, sin), lambda: torch.complex(cos, sin)[:, :, None, :])  # [B, S, 1, D/2]
        return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)

    def mla_latent(self, q_pe, kv, k_pe, norm_weight, eps, cos, sin, kv_cache, pe_cache, rows, pos):
        B, S = kv.shape[:2]
        bf16 = torch.bfloat16
        if (self.native is not None and B * S < UPCAST_ROWS and q_pe.dtype == kv.dtype == k_pe.dtype == bf16
                and norm_weight.dtype == kv_cache.dtype == pe_cache.dtype == bf16 and q_pe.device.type == "cpu"
                and q_pe.stride(-1) == kv.stride(-1) == k_pe.stride(-1) == 1 and kv.stride(1) == k_pe.stride(1)
                and kv.stride(0) == S * kv.stride(1) and k_pe.stride(0) == S * k_pe.stride(1)
                and q_pe.stride(0) == S * q_pe.stride(1) and norm_weight.is_contiguous()
                and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
                and kv_cache.is_contiguous() and pe_cache.is_contiguous() and rows.numel() == B
                and rows.dtype == pos.dtype == torch.int64):
            return self.native.mla_latent(q_pe, kv, k_pe, norm_weight, eps, cos, sin, kv_cache, pe_cache,
                                          rows.reshape(B).contiguous(), pos.contiguous())
        return super().mla_latent(q_pe, kv, k_pe, norm_weight, eps, cos, sin, kv_cache, pe_cache, rows, pos)

    def attention(self, q, k, v, scale, mask):
        """Prefill attention through torch's flash kernel (fp32 accumulation and softmax, as the reference). Its
        fast path wants equal q/k and v head dims, so v is zero-padded to q's and the padding sliced off."""
        if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float32) or v.shape[-1] > q.shape[-1]:
            return super().attention(q, k, v, scale, mask)
        dv = v.shape[-1]
        if dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        step = self.current_step
        # a prompt from position 0 (S == T): torch's own causal path skips the masked half (2x at 2048 tokens)
        causal = mask is not None and step is not None and mask is step.mask and step.causal and q.shape[1] == k.shape[1]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H, S, D]
                                           attn_mask=None if mask is None or causal else mask[:, None],
                                           is_causal=causal, scale=scale)
        return o.transpose(1, 2)[..., :dv]  # [B, S, H, Dv]

    def mla_absorbed(self, q_nope, q_pe, w_uk, w_uv, kv, pe, scale, mask, rows=None):
        B, S, H, N = q_nope.shape
        step = self.current_step
        positioned = step is not None and mask is not None and mask is step.mask and step.write_pos is not None
        if ((positioned or S == 1 and mask is None) and self._native_ok(q_nope)
                and q_pe.dtype == kv.dtype == pe.dtype == torch.bfloat16
                and w_uk.dtype == w_uv.dtype and w_uk.dtype in (torch.float32, torch.bfloat16)
                and w_uk.is_contiguous() and w_uv.is_contiguous()
                and q_pe.stride(-1) == q_nope.stride(-1) == 1 and kv.stride(-1) == pe.stride(-1) == 1
                and kv.stride(1) == kv.shape[2] and pe.stride(1) == pe.shape[2]
                and (rows is None or rows.dtype == torch.int64)):
            # a position step's mask is a per-row prefix: query s of row b reads keys 0 .. write_pos[b, s] only
            # (S > 1: a verification of drafts or a prefill chunk, every query in the one call)
            lens = step.query_lens if positioned else None  # [B, S]
            if rows is not None:  # the slots read in place
                rows = rows.contiguous()
            return self.native.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale, lens, rows)
        return super().mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale, mask, rows)

    def moe_gate(self, x, weight, bias, p: GateParams):
        if self._native_gate_ok(x, weight, bias, p):
            group_score = {"top2_sum": 2, "max": 1, "none": 0}[p.group_score]
            if x.shape[0] < UPCAST_ROWS:  # decode: the product in C too (one call)
                x = x.contiguous() if x.dtype == torch.bfloat16 else x.float().contiguous()
            else:  # a prompt: the reference's own fp32 GEMM, then the selection in C (~10 torch ops per layer)
                x, weight = F.linear(x.float(), weight), None  # [T, E]
            return self.native.moe_gate(x, weight, bias, p.top_k, p.n_group, p.topk_group,
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
        k, routes = ids.shape[1], ids.numel()
        if self._native_ok(x, experts.w1, experts.w2, experts.w3):
            if ((routes >= AMX_ROUTES_PER_EXPERT * experts.routed or routes > NATIVE_MOE_ROUTES) and self.native.amx
                    and x.shape[1] % 32 == 0 and experts.w1.shape[1] % 32 == 0):  # the AMX tiles' K and N steps
                # several rows per expert: on AMX tiles, routes sorted in C (the reference's roundings; no host sync)
                y = self.native.moe_amx(x.contiguous(), ids.contiguous(), weights.float().contiguous(), experts.w1,
                                        experts.w3, experts.w2, experts.s1, experts.s3, experts.s2, experts.first)
                if y is not None:
                    return y
            if routes <= NATIVE_MOE_ROUTES:
                # decode and short prompts: one call, no host sync on the ids; other ranks' experts are skipped inside
                return self.native.moe(x.contiguous(), ids.contiguous(), weights.float().contiguous(), experts.w1,
                                       experts.w3, experts.w2, experts.s1, experts.s3, experts.s2, experts.first)
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
