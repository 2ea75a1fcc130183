"""MLA decode attention on the cpu backend at DeepSeek-V3's dims, side by side in one run.

One decode step's absorbed attention of one layer (128 heads, latent C = 512, rope R = 64, nope 128, value 128,
bf16 cache and absorbed projections): the C kernel (`dsv3_mla_absorbed`: heads in groups sharing each tile of keys,
long contexts split into chunks) against the plain-torch composition the backend runs without it (the interface's
bmm / softmax / bmm), at 1K-32K cached tokens, batch 1 and 8. Beside each: multiply-adds per second, what the
layer's attention would cost a 61-layer model per token, and the AVX2 build's time where the CPU runs a wider one.

    python benchmarks/cpu_attention.py [--no-write]
    python benchmarks/cpu_attention.py --smoke     # small shapes (the test suite runs this)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import append_section, cpu_line, parser  # noqa: E402


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--smoke", action="store_true", help="small shapes: checks the script runs")
    args = ap.parse_args()
    from dsv3.backends.cpu import native
    from dsv3.backends.cpu.ops import CpuKernels

    lib = native.load()
    if lib is None:
        sys.exit("cpu_attention: the C kernels are not built here (no compiler, or DSV3_CPU_NATIVE=0)")
    # the AVX2 build too where the CPU runs a wider one (AMD Zen 2/3 and older Xeons run that build)
    avx2 = native.load("avx2") if lib.isa != "avx2" and "avx2" in native.supported_isas() else None
    H, N, C, R, V = (8, 32, 64, 16, 32) if args.smoke else (128, 128, 512, 64, 128)
    cases = [(1, 300), (2, 1500)] if args.smoke else [(1, 1024), (1, 4096), (1, 16384), (1, 32768), (8, 4096)]
    plain = CpuKernels()
    plain.native = None
    g = torch.Generator().manual_seed(0)
    rows = ["| batch | cached tokens | C kernel (ms) | plain torch (ms) | C / torch speed-up | C kernel GMAC/s | "
            "x 61 layers (ms per token) |" + (" AVX2 build (ms) |" if avx2 else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if avx2 else "")]
    for B, T in cases:
        q_nope = torch.randn(B, 1, H, N, generator=g).bfloat16()
        q_pe = torch.randn(B, 1, H, R, generator=g).bfloat16()
        w_uk = (torch.randn(H, N, C, generator=g) * N ** -0.5).bfloat16()
        w_uv = (torch.randn(H, C, V, generator=g) * C ** -0.5).bfloat16()
        kv, pe = torch.randn(B, T, C, generator=g).bfloat16(), torch.randn(B, T, R, generator=g).bfloat16()
        scale = (N + R) ** -0.5
        repeats = 2 if args.smoke or T > 8192 else 5
        ours = best_ms(lambda: lib.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale), repeats)
        theirs = best_ms(lambda: plain.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale, None), repeats)
        macs = B * H * (N * C + T * (C + R) + T * C + C * V)
        narrow = (f" {best_ms(lambda: avx2.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale), repeats):.2f} |"
                  if avx2 else "")
        rows.append(f"| {B} | {T} | {ours:.2f} | {theirs:.2f} | **{theirs / ours:.2f}x** | {macs / ours / 1e6:.0f} | "
                    f"{61 * ours:.0f} |{narrow}")
    note = (f"One layer's absorbed MLA of one decode step: {H} heads, latent {C}, rope {R}, nope {N}, value {V}; bf16 "
            "cache and absorbed projections; best of 2-5. Plain torch: the same op through the kernel interface's "
            "composition (torch bmm, softmax, bmm) with the C kernels off. "
            f"torch threads {torch.get_num_threads()}; {cpu_line()}; C kernels built for {lib.isa}")
    if avx2:
        note += " (the last column: the avx2 build on the same CPU; plain torch keeps this CPU's own instructions)"
    text = "\n".join(rows + ["", note + "."])
    print(text)
    if not args.no_write and not args.smoke:
        append_section("MLA decode attention at DeepSeek-V3's dims, cpu", "python benchmarks/cpu_attention.py", text)


if __name__ == "__main__":
    main()
