"""Decode linears on the cpu backend's C kernels: FP8 against bf16 weights, and against the memory's read rate.

Batch-1 decode reads every weight once, so a linear of 1-2 rows should run at the rate the memory delivers its
bytes. This measures whether it does: `dsv3_linear` over DeepSeek-V3's shapes (an expert's gate/up and down at
tensor parallel 1, an attention projection), 1 and 2 rows, weights streamed from memory (copies rotated through
more than the last-level cache holds) and weights in cache (one copy again and again: the kernel's arithmetic
alone), on 1 thread and on all, for each build this CPU runs: AVX512-BF16 with FP8 widened by byte-shuffle
table (VBMI), the same without the table (through fp16), fp32 FMAs (AVX-512), and AVX2. Beside them, the read
rate of a plain sum over the same bytes. Where FP8 runs below the read rate from memory, decode is bound by the
kernel's arithmetic, not by the bytes: the figure to improve (and why a verify step's extra experts cost more
than their bytes predict, benchmarks/speculative.py).

    python benchmarks/cpu_linear.py [--no-write]
    python benchmarks/cpu_linear.py --smoke     # small shapes, one build (the test suite runs this)
"""

from __future__ import annotations

import ctypes
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import append_section, cpu_line, l3_size, parser  # noqa: E402

#: (what, N, K): DeepSeek-V3's linears at tensor parallel 1
SHAPES = [("expert gate/up", 2048, 7168), ("expert down", 7168, 2048), ("attention wq_b", 24576, 1536)]
SMOKE_SHAPES = [("small", 200, 300), ("tail", 129, 1029)]


def builds(native, smoke: bool) -> dict:
    """The builds to compare, by name: the widest first, each only where this CPU runs it."""
    have = native.supported_isas()
    out = {}
    for isa in ("avx512bf16", "avx512", "avx2"):
        if isa in have:
            lib = native.load(isa)
            if lib is not None:
                table = bool(lib.lib.dsv3_fp8_table())
                out[f"{isa}{' + table' if table else ''}"] = lib
                if table and not smoke:  # the same build converting through fp16: what the table gains
                    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
                    path = native._build(cc, isa, optional=False)
                    out[f"{isa}, fp16 widening"] = native.Native(ctypes.CDLL(str(path)), path)
        if smoke and out:
            break
    return out


def rate(fn, copies: int, nbytes: int, repeats: int) -> float:
    """GB/s of weight bytes: fn(i) over copies i = 0 .. copies - 1, best of repeats."""
    fn(0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(copies):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / copies)
    return nbytes / best / 1e9


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--smoke", action="store_true", help="small shapes, one build: checks the script runs")
    args = ap.parse_args()
    from dsv3.backends.cpu import native

    if native.load() is None:
        sys.exit("cpu_linear: the C kernels are not built here (no compiler, or DSV3_CPU_NATIVE=0)")
    libs = builds(native, args.smoke)
    threads = torch.get_num_threads()
    stream_bytes = 2 ** 20 if args.smoke else 768 * 2 ** 20  # past a large server L3 (this one: see the note)
    repeats = 1 if args.smoke else 3
    g = torch.Generator().manual_seed(0)
    rows = ["| linear (N x K) | rows | threads | where the weights are | " + " | ".join(
        f"{name} FP8 | {name} bf16" for name in libs) + " | read rate (sum) |",
        "|---" * (5 + 2 * len(libs)) + "|"]
    summary = []  # the fastest build's rate from memory on all threads, as a fraction of the read rate
    for what, N, K in SMOKE_SHAPES if args.smoke else SHAPES:
        copies = max(2, stream_bytes // (N * K))
        w8 = [(torch.randn(N, K, generator=g) * 0.05).to(torch.float8_e4m3fn) for _ in range(copies)]
        s8 = [torch.rand((N + 127) // 128, (K + 127) // 128, generator=g) + 0.5 for _ in range(copies)]
        w16 = [w.bfloat16() for w in w8[:max(2, copies // 2)]]  # the same bytes as the FP8 copies together
        flat8 = torch.cat([w.view(torch.uint8).flatten() for w in w8])  # what the read rate sums
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            read = rate(lambda i: flat8[:len(flat8) // 8 * 8].view(torch.int64).sum(), 1, len(flat8) // 8 * 8, repeats)
            for M in (1, 2):
                x = torch.randn(M, K, generator=g).bfloat16()
                for where, cut in (("memory", None), ("cache", 1)):
                    cells = []
                    for lib in libs.values():
                        n8, n16 = cut or len(w8), cut or len(w16)
                        cells.append(rate(lambda i: lib.linear(x, w8[i % n8], s8[i % n8]), len(w8), N * K, repeats))
                        cells.append(rate(lambda i: lib.linear(x, w16[i % n16]), len(w16), 2 * N * K, repeats))
                    if n_threads == threads and where == "memory":  # the decode case: what the summary judges
                        summary.append(f"{what}, {M} row{'s' if M > 1 else ''}: FP8 {max(cells[0::2]) / read:.0%}, "
                                       f"bf16 {max(cells[1::2]) / read:.0%}")
                    rows.append(f"| {what} ({N} x {K}) | {M} | {n_threads} | {where} | "
                                + " | ".join(f"{c:.1f}" for c in cells) + f" | {read:.1f} |")
                    print(rows[-1], flush=True)
        torch.set_num_threads(threads)
    text = "\n".join(rows + ["", f"From memory on {threads} threads, the fastest build's rate over the read rate: "
                             + "; ".join(summary) + ".", "", (
        "GB/s of weight bytes through `dsv3_linear` (FP8: 1 byte a weight plus its block scales; bf16: 2), best of "
        f"{repeats}; 'memory': {stream_bytes // 2 ** 20} MiB of copies rotated (this CPU's L3: {l3_size()}); "
        "'cache': one copy again and again (the kernel's arithmetic alone). Read rate: torch summing the FP8 copies "
        f"as int64 on as many threads. {cpu_line()}; torch {torch.__version__}.")])
    print(text)
    if not args.no_write and not args.smoke:
        append_section("FP8 and bf16 decode linears against the read rate, cpu", "python benchmarks/cpu_linear.py",
                       text)


if __name__ == "__main__":
    main()
