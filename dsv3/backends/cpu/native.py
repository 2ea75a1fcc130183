"""native.c, built at first use and called through ctypes: the cpu backend's decode kernels.

The library is compiled once per (source, compiler, CPU flags) into the cache directory
($DSV3_CACHE_DIR, else ~/.cache/dsv3) with the system C compiler. Where there is none, or
DSV3_CPU_NATIVE=0, `load()` returns None and the cpu backend stays plain torch. The OpenMP
runtime is torch's own libgomp (same soname, already loaded), so both share one thread pool and
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
SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("DSV3_CACHE_DIR") or Path.home() / ".cache" / "dsv3")


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([src, version.encode(), _cpu_flags().encode(), " ".join(FLAGS).encode()])).hexdigest()
    lib = _cache_dir() / f"native-{platform.machine()}-{key[:16]}.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build aside, then rename: concurrent ranks are safe
        out = Path(tmp) / lib.name
        run = subprocess.run([cc, *FLAGS, "-o", str(out), str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        os.replace(out, lib)
    return lib


class Native:
    """Typed wrappers over the library's functions. Tensors must be contiguous and on the CPU."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.lib, self.path = lib, path
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        sigs = {
            "dsv3_linear_bf16": [p, p, p, i64, i64, i64, p, i32],
            "dsv3_moe_bf16": [p, i64, i64, p, p, i64, i64, p, p, p, i64, i64, p, p, i32],
            "dsv3_rms_norm_bf16": [p, p, p, i64, i64, f32],
            "dsv3_rope_bf16": [p, p, p, p, i64, i64, i64, i64, i64],
            "dsv3_moe_gate": [p, p, p, i64, i64, i64, i64, i64, i64, i32, i32, i32, f32, p, p, p, p],
            "dsv3_mla_absorbed": [p, i64, i64, p, i64, i64, p, p, p, p, p] + [i64] * 9 + [f32, p, p, i32],
            "dsv3_dequant_fp8": [p, p, p, i64, i64, i64, i32, p, i32],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None

    def linear_bf16(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ weight [N, K]ᵀ -> [M, N], all bf16 (fp32 accumulation, one rounding)."""
        M, K = x.shape
        y, scratch = torch.empty(M, weight.shape[0], dtype=torch.bfloat16), torch.empty(M * K)
        self.lib.dsv3_linear_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), M, weight.shape[0], K,
                                  scratch.data_ptr(), torch.get_num_threads())
        return y

    def moe_bf16(self, x: torch.Tensor, ids: torch.Tensor, alpha: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                 w2: torch.Tensor, first: int = 0) -> torch.Tensor:
        """x [T, D] bf16, ids [T, k] int64 (global; those outside first .. first + E - 1 are skipped), alpha [T, k]
        fp32, w1/w3 [E, I, D], w2 [E, D, I] bf16 -> [T, D] bf16 = Σ_j alpha · SwiGLU expert, fp32 inside."""
        (T, D), k, I = x.shape, ids.shape[1], w1.shape[-2]
        # xf and acc [T, D], h [T·k, I], then T·k int64 row indices (two floats each, 8-byte aligned)
        y, scratch = torch.empty(T, D, dtype=torch.bfloat16), torch.empty(2 * T * D + T * k * I + 2 * T * k + 1)
        E = w1.shape[0] if w1.dim() == 3 else 1
        self.lib.dsv3_moe_bf16(x.data_ptr(), T, k, ids.data_ptr(), alpha.data_ptr(), first, E, w1.data_ptr(),
                               w3.data_ptr(), w2.data_ptr(), D, I, scratch.data_ptr(), y.data_ptr(),
                               torch.get_num_threads())
        return y

    def rms_norm_bf16(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D] bf16 contiguous, weight [D] bf16 -> [..., D] bf16."""
        y = torch.empty_like(x)
        D = x.shape[-1]
        self.lib.dsv3_rms_norm_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // D, D, eps)
        return y

    def rope_bf16(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D] bf16 (B·S tokens at one stride, unit last stride), cos/sin [B, S, D/2] fp32 contiguous."""
        B, S, H, D = x.shape
        y = torch.empty(B, S, H, D, dtype=x.dtype)
        self.lib.dsv3_rope_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), B * S, H, D,
                                x.stride(1), x.stride(2))
        return y

    def moe_gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int,
                 topk_group: int, sigmoid: bool, group_score: int, norm: bool, route_scale: float):
        """x [T, D] fp32, weight [E, D] fp32, bias [E] fp32 or None -> (weights [T, k] fp32, ids [T, k] int64)."""
        T, D = x.shape
        E = weight.shape[0]
        scratch, flags = torch.empty(3 * E), torch.empty(E + n_group, dtype=torch.uint8)
        w, ids = torch.empty(T, top_k), torch.empty(T, top_k, dtype=torch.int64)
        self.lib.dsv3_moe_gate(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), T, D, E,
                               top_k, n_group, topk_group, int(sigmoid), group_score, int(norm), route_scale,
                               scratch.data_ptr(), flags.data_ptr(), w.data_ptr(), ids.data_ptr())
        return w, ids

    def mla_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor,
                     kv: torch.Tensor, pe: torch.Tensor, scale: float, lens: torch.Tensor | None = None) -> torch.Tensor:
        """One query per sequence: q_nope [B, H, N], q_pe [B, H, R] bf16 (unit last strides); w_uk [H, N, C],
        w_uv [H, C, V] fp32 contiguous; kv [B, T, C], pe [B, T, R] bf16 with unit rows -> [B, H, V] bf16.
        lens [B] int64 contiguous (each <= T): row b attends to its first lens[b] keys only; None: all T."""
        B, H, N = q_nope.shape
        T, C, R, V = kv.shape[1], kv.shape[2], pe.shape[2], w_uv.shape[2]
        y, scratch = torch.empty(B, H, V, dtype=torch.bfloat16), torch.empty(B * H * (2 * C + T))
        self.lib.dsv3_mla_absorbed(q_nope.data_ptr(), q_nope.stride(0), q_nope.stride(1), q_pe.data_ptr(), q_pe.stride(0),
                                   q_pe.stride(1), w_uk.data_ptr(), w_uv.data_ptr(), kv.data_ptr(), pe.data_ptr(), y.data_ptr(),
                                   B, H, N, T, C, R, V, kv.stride(0), pe.stride(0), scale,
                                   None if lens is None else lens.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
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


@lru_cache(maxsize=4)
def _byte_values(fp8_dtype: torch.dtype) -> torch.Tensor:
    """The 256 values of an FP8 format as fp32, from torch's own cast (so the C side knows no format)."""
    return torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """core.fp8.dequantize (same bits), through the C kernel where it is built and the layout allows."""
    lib = load()
    if (lib is None or dtype not in (torch.bfloat16, torch.float32) or weight.dim() != 2 or weight.device.type != "cpu"
            or not is_fp8(weight.dtype) or tuple(scale.shape) != scale_shape(weight.shape)):
        return F8.dequantize(weight, scale, dtype)
    return lib.dequant_fp8(weight.contiguous(), scale.float().contiguous(), dtype)


@lru_cache(maxsize=1)
def load() -> Native | None:
    """The built library, or None (logged once, with the reason) where it cannot be had."""
    if os.environ.get("DSV3_CPU_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.info("cpu backend: no C compiler found; decode runs on plain torch (slower)")
        return None
    try:
        path = _build(cc)
        return Native(ctypes.CDLL(str(path)), path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("cpu backend: native kernels unavailable (%s); decode runs on plain torch (slower)", e)
        return None
