"""MLA decode attention on the cpu backend at DeepSeek-V3's dims, side by side in one run.

One decode step's absorbed attention of one layer (128 heads, latent C = 512, rope R = 64, nope 128, value 128,
bf16 cache and absorbed projections): the C kernel (`dsv3_mla_absorbed`: heads in groups sharing each tile of keys,
long contexts split into chunks, each head's projections read once for all the queries) against the plain-torch
composition the backend runs without it (the interface's bmm / softmax / bmm), at 1K-32K cached tokens, batch 1
and 8, and the 2 queries of a verify step. The C kernel is timed twice: on one layer's weights again and again (in
cache) and with the absorbed projections (33.5 MB a layer) rotated through copies that outgrow the last-level
cache, as a 61-layer model's 2 GB of them do: that time makes the per-token column. Beside each: multiply-adds
per second and the AVX2 build's time (in cache) where the CPU runs a wider one.

    python benchmarks/cpu_attention.py [--no-write]
    python benchmarks/cpu_attention.py --smoke     # small shapes (the test suite runs this)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import append_section, cpu_line, l3_bytes, l3_size, parser  # noqa: E402


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
    cases = ([(1, 1, 300), (2, 1, 1500), (1, 2, 300)] if args.smoke else
             [(1, 1, 1024), (1, 2, 1024), (1, 1, 4096), (1, 1, 16384), (1, 1, 32768), (8, 1, 1024), (8, 1, 4096)])
    plain = CpuKernels()
    plain.native = None
    g = torch.Generator().manual_seed(0)
    # copies of the absorbed projections to rotate through: past the last-level cache, as a whole model's are
    w_bytes = 2 * H * N * C * 2
    copies = 2 if args.smoke else max(2, -(-2 * l3_bytes() // w_bytes) if l3_bytes() else 12)
    weights = [((torch.randn(H, N, C, generator=g) * N ** -0.5).bfloat16(),
                (torch.randn(H, C, V, generator=g) * C ** -0.5).bfloat16()) for _ in range(copies)]
    rows = ["| batch x queries | cached tokens | C kernel (ms) | C kernel, weights from memory (ms) | plain torch (ms) "
            "| C / torch speed-up | C kernel GMAC/s | x 61 layers (ms per token) |"
            + (" AVX2 build (ms) |" if avx2 else ""), "|---|---|---|---|---|---|---|---|" + ("---|" if avx2 else "")]
    for B, S, T in cases:
        q_nope = torch.randn(B, S, H, N, generator=g).bfloat16()
        q_pe = torch.randn(B, S, H, R, generator=g).bfloat16()
        w_uk, w_uv = weights[0]
        kv, pe = torch.randn(B, T, C, generator=g).bfloat16(), torch.randn(B, T, R, generator=g).bfloat16()
        scale = (N + R) ** -0.5
        repeats = 2 if args.smoke or T > 8192 else 5
        ours = best_ms(lambda: lib.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale), repeats)

        def rotated():
            for uk, uv in weights:
                lib.mla_absorbed(q_nope, q_pe, uk, uv, kv, pe, scale)
        cold = best_ms(rotated, max(1, repeats // 2)) / copies
        theirs = best_ms(lambda: plain.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale, None), repeats)
        macs = B * S * H * (N * C + T * (C + R) + T * C + C * V)
        narrow = (f" {best_ms(lambda: avx2.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv, pe, scale), repeats):.2f} |"
                  if avx2 else "")
        rows.append(f"| {B} x {S} | {T} | {ours:.2f} | {cold:.2f} | {theirs:.2f} | **{theirs / ours:.2f}x** | "
                    f"{macs / ours / 1e6:.0f} | {61 * cold:.0f} |{narrow}")
        print(rows[-1], flush=True)
    note = (f"One layer's absorbed MLA of one decode step: {H} heads, latent {C}, rope {R}, nope {N}, value {V}; bf16 "
            "cache and absorbed projections; best of 2-5. Batch x queries: 1 x 2 is a verify step of one draft. "
            f"Weights from memory: the projections rotated through {copies} copies ({copies * w_bytes / 2**20:.0f} "
            f"MiB, past this CPU's {l3_size()} L3); the per-token column is 61 times that. Plain torch: the same op "
            "through the kernel interface's composition (torch bmm, softmax, bmm) with the C kernels off. "
            f"torch threads {torch.get_num_threads()}; {cpu_line()}; C kernels built for {lib.isa}")
    if avx2:
        note += " (the last column: the avx2 build on the same CPU; plain torch keeps this CPU's own instructions)"
    text = "\n".join(rows + ["", note + "."])
    print(text)
    if not args.no_write and not args.smoke:
        append_section("MLA decode attention at DeepSeek-V3's dims, cpu", "python benchmarks/cpu_attention.py", text)


if __name__ == "__main__":
    main()
