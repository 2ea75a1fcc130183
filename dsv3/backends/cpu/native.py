"""csrc/ (C), built at first use into one library and called through ctypes: the cpu backend's decode kernels.

The library is compiled once per (source, compiler, instruction set, CPU) into the cache directory
($DSV3_CACHE_DIR, else ~/.cache/dsv3) with the system C compiler, for the widest instruction set this CPU
runs (ISAS: avx512, avx2, generic; DSV3_CPU_ISA picks another; DSV3_CPU_CFLAGS adds compiler flags, e.g. a
sanitizer's: they are part of the cache key, so such a build never serves a normal run). Where there is no
compiler, or DSV3_CPU_NATIVE=0, `load()` returns None and the cpu backend stays plain torch. The OpenMP runtime is
torch's own libgomp (same soname, already loaded), so both share one thread pool and
`torch.set_num_threads` governs both.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ...core import fp8 as F8
from ...core.fp8 import BLOCK, is_fp8, scale_shape

log = logging.getLogger("dsv3")
#: the C sources: every .c is compiled into one library; the headers are shared (csrc/common.h describes the files)
CSRC = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
#: instruction sets the C kernels are built for, widest first: compiler flags and the /proc/cpuinfo flags they need
ISAS = {
    # AVX-512 plus AMX tiles (prefill's routed experts, dsv3_grouped_amx) and AVX512-BF16 (to round weights into them)
    "amx": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c", "-mavx512bf16", "-mamx-tile",
             "-mamx-bf16"], {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c", "avx512_bf16", "amx_tile",
                             "amx_bf16"}),
    # AVX-512 plus AVX512-BF16 without AMX (AMD Zen 4/5, Cooper Lake): a weight row against several rows at once
    # (batched decode, draft verification) on bf16 pair dot products
    "avx512bf16": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c", "-mavx512bf16"],
                   {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c", "avx512_bf16"}),
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
               {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "generic": ([], set()),
}


#: flags added to a build where the CPU has the instruction set: (compiler flag, /proc/cpuinfo flag, only in builds
#: with this flag). AVX512-VBMI's byte shuffles widen FP8 to bf16 by table (csrc/dot.h fp8_bf16x64): Zen 4/5 and
#: every AMX Xeon have it, Cooper Lake (AVX512-BF16 without it) keeps the conversion through fp16.
OPTIONAL = [("-mavx512vbmi", "avx512vbmi", "-mavx512bf16")]


def _flags(isa: str, optional: bool = True) -> list[str]:
    """The compiler flags of the `isa` build on this CPU: ISAS' and (`optional`) the OPTIONAL ones it runs."""
    flags, have = ISAS[isa][0], set(_cpu_flags().split(":", 1)[-1].split())
    return flags + [flag for flag, need, with_ in OPTIONAL if optional and with_ in flags and need in have]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_name() -> str:
    """The CPU's model name (for benchmark tables), or the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def supported_isas() -> list[str]:
    """The instruction sets of ISAS this CPU runs, widest first ("generic" always)."""
    flags = set(_cpu_flags().split(":", 1)[-1].split())
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    return [name for name, (_, need) in ISAS.items() if name == "generic" or (x86 and need <= flags)]


def _cache_dir() -> Path:
    return Path(os.environ.get("DSV3_CACHE_DIR") or Path.home() / ".cache" / "dsv3")


def _sources() -> tuple[list[Path], bytes]:
    """The .c files to compile, and every source file's name and bytes (what a build's cache key hashes)."""
    files = sorted(p for p in CSRC.iterdir() if p.suffix in (".c", ".h"))
    return [p for p in files if p.suffix == ".c"], b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)


def _build(cc: str, isa: str, optional: bool = True) -> Path:
    units, src = _sources()
    flags = FLAGS + _flags(isa, optional) + os.environ.get("DSV3_CPU_CFLAGS", "").split()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([src, version.encode(), _cpu_flags().encode(), " ".join(flags).encode()])).hexdigest()
    lib = _cache_dir() / f"native-{platform.machine()}-{isa}-{key[:16]}.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build aside, then rename: concurrent ranks are safe
        out = Path(tmp) / lib.name
        run = subprocess.run([cc, *flags, f"-I{CSRC}", "-o", str(out), *map(str, units), "-lm"], capture_output=True,
                             text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        os.replace(out, lib)
    return lib


class Native:
    """Typed wrappers over the library's functions. Tensors must be contiguous and on the CPU.

    Weights are bf16, or FP8 (e4m3fn/fnuz) with their fp32 block scales [ceil(N/128), ceil(K/128)] (per expert
    for stacks): `scale=None` means bf16."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.lib, self.path = lib, path
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        sigs = {
            "dsv3_linear": [p, i64, i64, p, p, f32, i64, p, p, i32],
            "dsv3_moe": [p, i64, i64, p, p, i64, i64, p, p, p, p, p, p, f32, i64, i64, p, p, i32],
            "dsv3_rms_norm_bf16": [p, i64, p, p, i64, i64, f32, i32],
            "dsv3_rope_bf16": [p, p, p, p, i64, i64, i64, i64, i64, i32],
            "dsv3_mla_latent": [p, i64, i64, p, p, i64, p, f32, p, p, p, p, i64, p, p] + [i64] * 5 + [p],
            "dsv3_moe_gate": [p, i32, p, p, i64, i64, i64, i64, i64, i64, i32, i32, i32, f32, p, p, i32],
            "dsv3_mla_absorbed": [p, i64, i64, i64, p, i64, i64, i64, p, p, i32, p, p, p] + [i64] * 10 + [f32, p, p, i32],
            "dsv3_dequant_fp8": [p, p, p, i64, i64, i64, i32, p, i32],
            "dsv3_fp8_to_bf16": [p, p, f32, i64, i64, p, i32],
            "dsv3_combine_rows": [p, p, p, i64, i64, i64, p, i32],
            "dsv3_softmax_exp": [p, p, i64],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        lib.dsv3_count_bytes.argtypes, lib.dsv3_count_bytes.restype = [p, i64, i32, i32, i32], i64
        lib.dsv3_grouped_amx.argtypes = [p, p, p, i64, i64, p, p, p, p, f32, i64, i64, p, i32]
        lib.dsv3_grouped_amx.restype = i32
        lib.dsv3_moe_amx.argtypes = [p, i64, i64, p, p, i64, i64, p, p, p, p, p, p, f32, i64, i64, p, i32]
        lib.dsv3_moe_amx.restype = i32
        lib.dsv3_linear_amx.argtypes, lib.dsv3_linear_amx.restype = [p, i64, i64, p, p, f32, i64, p, p, i32], i32
        lib.dsv3_mlp_amx.argtypes, lib.dsv3_mlp_amx.restype = [p, i64, p, p, p, p, p, p, f32, i64, i64, p, p, i32], i32
        lib.dsv3_isa.argtypes, lib.dsv3_isa.restype = [], ctypes.c_char_p
        #: the instruction set of this build: "amx" (AVX-512 + AMX tiles), "avx512bf16", "avx512", "avx2" or "generic"
        self.isa = lib.dsv3_isa().decode()
        lib.dsv3_fp8_table.argtypes, lib.dsv3_fp8_table.restype = [], ctypes.c_int
        #: FP8 weights widen to bf16 by table (AVX512-VBMI on top of a bf16 build: OPTIONAL)
        self.fp8_table = bool(lib.dsv3_fp8_table())

    @staticmethod
    def _w(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[int, int | None, float]:
        """(weight pointer, scale pointer or None, fmt) for the C side's Mat."""
        if scale is None:
            return weight.data_ptr(), None, 0.0
        return weight.data_ptr(), scale.data_ptr(), fp8_unit(weight.dtype)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] bf16 @ weight [N, K]ᵀ (+ residual [M, N] bf16) -> [M, N] bf16 (fp32 accumulation, one rounding)."""
        M, K = x.shape
        N = weight.shape[0]
        y = torch.empty(M, N, dtype=torch.bfloat16)
        self.lib.dsv3_linear(x.data_ptr(), M, K, *self._w(weight, scale), N,
                             None if residual is None else residual.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y

    def linear_amx(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """linear's arithmetic (exact products, fp32 sums per FP8 block, one rounding) with the products on AMX tiles,
        for 1-16 rows: a tile product costs the same for any of them, where a pair dot product's cost grows with the
        rows (csrc/amx.c). None where the build or the OS gives no AMX, or K is not a multiple of 32."""
        M, K = x.shape
        N = weight.shape[0]
        y = torch.empty(M, N, dtype=torch.bfloat16)
        rc = self.lib.dsv3_linear_amx(x.data_ptr(), M, K, *self._w(weight, scale), N,
                                      None if residual is None else residual.data_ptr(), y.data_ptr(),
                                      torch.get_num_threads())
        return y if rc == 0 else None

    def mlp_amx(self, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                s1: torch.Tensor | None = None, s3: torch.Tensor | None = None, s2: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """moe's arithmetic for a dense MLP (w1/w3 [I, D], w2 [D, I]) of 1-16 rows x [M, D], with the products on AMX
        tiles (linear_amx) -> [M, D] bf16. None where the build or the OS gives no AMX, or D or I is not a multiple
        of 32."""
        M, D = x.shape
        y = torch.empty(M, D, dtype=torch.bfloat16)
        p1, q1, fmt = self._w(w1, s1)
        p3, q3, _ = self._w(w3, s3)
        p2, q2, _ = self._w(w2, s2)
        rc = self.lib.dsv3_mlp_amx(x.data_ptr(), M, p1, q1, p3, q3, p2, q2, fmt, D, w1.shape[0],
                                   None if residual is None else residual.data_ptr(), y.data_ptr(),
                                   torch.get_num_threads())
        return y if rc == 0 else None

    def moe(self, x: torch.Tensor, ids: torch.Tensor, alpha: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
            w2: torch.Tensor, s1: torch.Tensor | None = None, s3: torch.Tensor | None = None,
            s2: torch.Tensor | None = None, first: int = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D] bf16, ids [T, k] int64 (global; those outside first .. first + E - 1 are skipped), alpha [T, k]
        fp32, w1/w3 [E, I, D], w2 [E, D, I] bf16 or FP8 (+ scales) -> [T, D] bf16 = (residual +) Σ_j alpha · SwiGLU
        expert, fp32 inside. A dense MLP is E = 1 (2-D weights), every id 0."""
        (T, D), k, I = x.shape, ids.shape[1], w1.shape[-2]
        y = torch.empty(T, D, dtype=torch.bfloat16)
        E = w1.shape[0] if w1.dim() == 3 else 1
        p1, q1, fmt = self._w(w1, s1)
        p3, q3, _ = self._w(w3, s3)
        p2, q2, _ = self._w(w2, s2)
        self.lib.dsv3_moe(x.data_ptr(), T, k, ids.data_ptr(), alpha.data_ptr(), first, E, p1, q1, p3, q3, p2, q2, fmt,
                          D, I, None if residual is None else residual.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y

    def rms_norm_bf16(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D] bf16 with unit last stride and its rows one stride apart (contiguous, or a column slice of a
        wider tensor: see rows_at_one_stride), weight [D] bf16 -> [..., D] bf16 contiguous."""
        D = x.shape[-1]
        y = torch.empty(x.shape, dtype=x.dtype)
        self.lib.dsv3_rms_norm_bf16(x.data_ptr(), x.stride(-2) if x.dim() > 1 else D, weight.data_ptr(), y.data_ptr(),
                                    x.numel() // D, D, eps, torch.get_num_threads())
        return y

    def rope_bf16(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D] bf16 (B·S tokens at one stride, unit last stride), cos/sin [B, S, D/2] fp32 contiguous."""
        B, S, H, D = x.shape
        y = torch.empty(B, S, H, D, dtype=x.dtype)
        self.lib.dsv3_rope_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), B * S, H, D,
                                x.stride(1), x.stride(2), torch.get_num_threads())
        return y

    def mla_latent(self, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                   rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Kernels.mla_latent in one call. q_pe [B, S, H, R], kv [B, S, C] and k_pe [B, S, R] bf16 views with unit last
        strides, (b, s) rows at one token stride (kv's and k_pe's the same); weight [C] bf16; cos/sin [B, S, R/2] fp32
        contiguous; caches [slots, T, C] / [slots, T, R] bf16 contiguous; rows [B] and pos [B, S] int64 contiguous."""
        B, S, H, R = q_pe.shape
        q = torch.empty(B, S, H, R, dtype=torch.bfloat16)
        self.lib.dsv3_mla_latent(q_pe.data_ptr(), q_pe.stride(1), q_pe.stride(2), kv.data_ptr(), k_pe.data_ptr(),
                                 kv.stride(1), weight.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(), kv_cache.data_ptr(),
                                 pe_cache.data_ptr(), kv_cache.shape[1], rows.data_ptr(), pos.data_ptr(), B, S, H,
                                 kv.shape[-1], R, q.data_ptr())
        return q

    def moe_gate(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, top_k: int, n_group: int,
                 topk_group: int, sigmoid: bool, group_score: int, norm: bool, route_scale: float):
        """x [T, D] bf16 or fp32, weight [E, D] fp32, bias [E] fp32 or None -> (weights [T, k] fp32, ids [T, k] int64).
        weight None: x is the logits, fp32 [T, E]."""
        T, D = x.shape
        E = D if weight is None else weight.shape[0]
        w, ids = torch.empty(T, top_k), torch.empty(T, top_k, dtype=torch.int64)
        self.lib.dsv3_moe_gate(x.data_ptr(), int(x.dtype == torch.bfloat16), None if weight is None else weight.data_ptr(),
                               None if bias is None else bias.data_ptr(), T, D, E, top_k, n_group, topk_group,
                               int(sigmoid), group_score, int(norm), route_scale, w.data_ptr(), ids.data_ptr(),
                               torch.get_num_threads())
        return w, ids

    def softmax_exp(self, x: torch.Tensor) -> torch.Tensor:
        """e^x of fp32 values x <= 0 as dsv3_mla_absorbed's softmax computes it (for the tests' accuracy check)."""
        x = x.float().contiguous()
        y = torch.empty_like(x)
        self.lib.dsv3_softmax_exp(x.data_ptr(), y.data_ptr(), x.numel())
        return y

    def mla_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                     kv: torch.Tensor, pe: torch.Tensor, scale: float, lens: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """S queries per sequence: q_nope [B, S, H, N], q_pe [B, S, H, R] bf16 (unit last strides); w_uk [H, N, C],
        w_uv [H, C, V] fp32 or bf16 (both the same), contiguous; kv [B, T, C], pe [B, T, R] bf16 with unit rows ->
        [B, S, H, V] bf16. lens [B, S] int64 contiguous (each <= T): query s of row b attends to the first lens[b, s]
        keys only; None: all T. rows [B] int64 contiguous: kv/pe are a whole cache [slots, T, ..] and row b reads
        slot rows[b] (each < slots)."""
        B, S, H, N = q_nope.shape
        T, C, R, V = kv.shape[1], kv.shape[2], pe.shape[2], w_uv.shape[2]
        y = torch.empty(B, S, H, V, dtype=torch.bfloat16)
        self.lib.dsv3_mla_absorbed(q_nope.data_ptr(), q_nope.stride(0), q_nope.stride(1), q_nope.stride(2),
                                   q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2), w_uk.data_ptr(),
                                   w_uv.data_ptr(), int(w_uk.dtype == torch.bfloat16), kv.data_ptr(), pe.data_ptr(),
                                   y.data_ptr(), B, S, H, N, T, C, R, V, kv.stride(0), pe.stride(0), scale,
                                   None if lens is None else lens.data_ptr(), None if rows is None else rows.data_ptr(),
                                   torch.get_num_threads())
        return y

    def dequant_fp8(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """core.fp8.dequantize bit for bit, in one pass: weight [N, K] e4m3fn/fnuz contiguous, scale fp32
        [ceil(N/128), ceil(K/128)] contiguous, dtype bf16 or fp32."""
        N, K = weight.shape
        lut = _byte_values(weight.dtype)
        y = torch.empty(N, K, dtype=dtype)
        self.lib.dsv3_dequant_fp8(weight.data_ptr(), lut.data_ptr(), scale.data_ptr(), N, K, BLOCK,
                                  int(dtype == torch.bfloat16), y.data_ptr(), torch.get_num_threads())
        return y

    @property
    def bf16dot(self) -> bool:
        """This build multiplies linears and experts on AVX512-BF16 pair dot products (dot_rows_bf16)."""
        return self.isa in ("amx", "avx512bf16")

    @property
    def amx(self) -> bool:
        """This build multiplies on AMX tiles (grouped_amx)."""
        return self.isa == "amx"

    def grouped_amx(self, a: torch.Tensor, starts: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None,
                    w2: torch.Tensor | None = None, s2: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor | None:
        """Grouped GEMM on AMX tiles over rows sorted by local expert (expert e's are starts[e] .. starts[e + 1];
        starts int64 [E + 1], R = starts[-1]): each expert's rows times its w [E, N, K]ᵀ -> [R, N] bf16, or with w2,
        silu(rows · wᵀ) · (rows · w2ᵀ) (an expert's SwiGLU, each result rounded to bf16 as separate bf16 ops would).
        Rows: a[rows] (rows int64 [R]; a [T, K]), or a's first R rows. bf16 or FP8 weights (+ scales); K a multiple
        of 32, N of 16 (SwiGLU) or 32. `out`: [>= R, N] bf16 to write into. `total`: R, where the caller knows it
        (else starts[-1] is read on the host, which a recorded step cannot do). None where the build or the OS gives
        no AMX."""
        E, N, K = w.shape
        R = int(starts[-1]) if total is None else total
        if a.shape[1] != K or not a.is_contiguous() or a.dtype != torch.bfloat16 or (rows is None and a.shape[0] < R):
            raise ValueError(f"grouped_amx: a {a.dtype} {list(a.shape)}; expected contiguous bf16 [T, {K}] with rows, "
                             f"or [>= {R}, {K}] without")
        if out is None:
            out = torch.empty(R, N, dtype=torch.bfloat16)
        if out.shape[0] < R or out.shape[1] != N or out.dtype != torch.bfloat16 or not out.is_contiguous():
            raise ValueError(f"grouped_amx: out {out.dtype} {list(out.shape)}; expected contiguous bf16 [>= {R}, {N}]")
        fmt = fp8_unit(w.dtype) if s is not None else 0.0
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        rc = self.lib.dsv3_grouped_amx(a.data_ptr(), ptr(rows), starts.data_ptr(), E, 1 if w2 is None else 2,
                                       w.data_ptr(), ptr(s), ptr(w2), ptr(s2), fmt, K, N, out.data_ptr(),
                                       torch.get_num_threads())
        return out[:R] if rc == 0 else None

    def moe_amx(self, x: torch.Tensor, ids: torch.Tensor, alpha: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                w2: torch.Tensor, s1: torch.Tensor | None = None, s3: torch.Tensor | None = None,
                s2: torch.Tensor | None = None, first: int = 0) -> torch.Tensor | None:
        """moe's routed experts (its arguments, no residual) on AMX tiles in one call: the routes sorted by expert in C,
        grouped_amx's gate/up SwiGLU and down, combine_rows' weighted sum; no count is read back on the host, so a
        recorded step can hold it. D and I multiples of 32. None where the build or the OS gives no AMX."""
        (T, D), k, (E, I, _) = x.shape, ids.shape[1], w1.shape
        y = torch.empty(T, D, dtype=torch.bfloat16)
        p1, q1, fmt = self._w(w1, s1)
        p3, q3, _ = self._w(w3, s3)
        p2, q2, _ = self._w(w2, s2)
        rc = self.lib.dsv3_moe_amx(x.data_ptr(), T, k, ids.data_ptr(), alpha.data_ptr(), first, E, p1, q1, p3, q3, p2,
                                   q2, fmt, D, I, y.data_ptr(), torch.get_num_threads())
        return y if rc == 0 else None

    def combine_rows(self, ys: torch.Tensor, pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """[T, D] bf16 = Σ_j w[t, j] · ys[pos[t, j]] in fp32, one rounding; ys [R, D] bf16, pos [T, k] int64 (-1:
        skipped), w [T, k] fp32."""
        T, k = pos.shape
        D = ys.shape[1]
        out = torch.empty(T, D, dtype=torch.bfloat16)
        self.lib.dsv3_combine_rows(ys.data_ptr(), pos.data_ptr(), w.data_ptr(), T, k, D, out.data_ptr(),
                                   torch.get_num_threads())
        return out

    def fp8_to_bf16(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """An FP8 weight [N, K] without NaN bytes (see count_nan) -> bf16, as dequant_fp8 (same bits), vectorized."""
        N, K = weight.shape
        y = torch.empty(N, K, dtype=torch.bfloat16)
        self.lib.dsv3_fp8_to_bf16(weight.data_ptr(), scale.data_ptr(), fp8_unit(weight.dtype), N, K, y.data_ptr(),
                                  torch.get_num_threads())
        return y

    def count_nan(self, weight: torch.Tensor) -> int:
        """How many bytes of a contiguous FP8 tensor are NaN codes."""
        codes = torch.nonzero(_byte_values(weight.dtype).isnan()).flatten().tolist()  # e4m3fn: 2, e4m3fnuz: 1
        if not codes:
            return 0
        a, b = codes[0], codes[-1]
        return self.lib.dsv3_count_bytes(weight.data_ptr(), weight.numel(), a, b, torch.get_num_threads())


def rows_at_one_stride(x: torch.Tensor) -> bool:
    """x's rows (all but the last dim, flattened) lie one stride apart, with a unit last stride."""
    if x.dim() < 2 or x.stride(-1) != 1:
        return x.is_contiguous()
    return all(x.stride(i) == x.shape[i + 1] * x.stride(i + 1) for i in range(x.dim() - 2))


@lru_cache(maxsize=4)
def _byte_values(fp8_dtype: torch.dtype) -> torch.Tensor:
    """The 256 values of an FP8 format as fp32, from torch's own cast (so the C side knows no format)."""
    return torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()


@lru_cache(maxsize=4)
def fp8_unit(fp8_dtype: torch.dtype) -> float:
    """The C kernels' fmt for an FP8 format: the value of one unit of a byte's bits placed in an fp16 (2^8 for
    e4m3fn, 2^7 for e4m3fnuz). Byte 0x38 (exponent field 7, mantissa 0) is 2^-8 there."""
    return float(_byte_values(fp8_dtype)[0x38]) * 2.0 ** 8


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """core.fp8.dequantize (same bits), through the C kernel where it is built and the layout allows."""
    lib = load()
    if (lib is None or dtype not in (torch.bfloat16, torch.float32) or weight.dim() != 2 or weight.device.type != "cpu"
            or not is_fp8(weight.dtype) or tuple(scale.shape) != scale_shape(weight.shape)):
        return F8.dequantize(weight, scale, dtype)
    return lib.dequant_fp8(weight.contiguous(), scale.float().contiguous(), dtype)


def load(isa: str | None = None) -> Native | None:
    """The library built for `isa` (default: $DSV3_CPU_ISA, else the widest this CPU runs), or None (logged once,
    with the reason) where it cannot be had."""
    if os.environ.get("DSV3_CPU_NATIVE", "1") == "0":
        return None
    isas = supported_isas()
    want = isa or os.environ.get("DSV3_CPU_ISA") or isas[0]
    if want not in isas:
        if isa is not None:
            raise ValueError(f"instruction set {isa!r} is not one this CPU runs; it runs {', '.join(isas)}")
        log.warning("DSV3_CPU_ISA=%s: not one of the instruction sets this CPU runs (%s); using %s", want,
                    ", ".join(isas), isas[0])
        want = isas[0]
    lib = _load(want)
    rest = isas[isas.index(want) + 1:]
    while lib is None and isa is None and want in ("amx", "avx512bf16") and rest:
        # a compiler without AMX (gcc < 11) or AVX512-BF16 (gcc < 9) intrinsics: the next build down
        want, rest = rest[0], rest[1:]
        lib = _load(want)
    return lib


@lru_cache(maxsize=None)
def _load(isa: str) -> Native | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.info("cpu backend: no C compiler found; decode runs on plain torch (slower)")
        return None
    try:
        try:
            path = _build(cc, isa)
        except RuntimeError:
            if _flags(isa) == _flags(isa, optional=False):
                raise
            path = _build(cc, isa, optional=False)  # a compiler without an OPTIONAL flag keeps the build's own
        return Native(ctypes.CDLL(str(path)), path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("cpu backend: native kernels unavailable (%s); decode runs on plain torch (slower)", e)
        return None
