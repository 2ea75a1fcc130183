"""The cuda backend's Triton kernels on a real NVIDIA GPU: the kernel tests, then timings at DeepSeek-V3 shapes.

1. runs tests/backends/triton/test_triton_kernels.py on the GPU (the cuda target);
2. measures the card's copy bandwidth;
3. FP8 block-scaled GEMM (act_quant + GEMM, as a linear layer runs) in TFLOP/s against BF16
   torch.matmul and torch._scaled_mm with the same 1x128 / 128x128 block scaling where this torch
   and GPU support it, for M in {1, 16, 128, 4096} and the (N, K) of q_b, kv_b, o, expert
   gate/up and down, and the dense MLP;
4. the fused MoE (256 experts, top-8, 7168 -> 2048) against a per-expert loop over the same kernels;
5. MLA decode over the latent cache in GB/s against the copy bandwidth.

Writes the tables to RESULTS.md with the GPU's name. Aims at under 5 minutes on an H200.

    python benchmarks/gpu_kernels.py [--no-write] [--tune]
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --smoke   # tiny shapes on CPU: checks the script runs

--tune also sweeps the GEMM's launch configs (tiles, warps, stages, split-K) at every FP8 linear shape of
DeepSeek-V3 at tensor parallel 1, 8 and 16 (--tune-tp) and each M bucket (--tune-m), and writes the best
into this GPU's config file, dsv3/backends/cuda/configs/nvidia-<arch>.json (--tune-out elsewhere; point
DSV3_LAUNCH_CONFIGS at it to use it uncommitted). Each config compiles once: the full sweep takes long;
`--tune-m 1,16,128,4096 --tune-tp 1` is a quick first pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import append_section, parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FN = torch.float8_e4m3fn
# (name, N, K) at tensor-parallel 1: 128 heads of 128 + 64, q_lora 1536, kv_lora 512, hidden 7168
GEMMS = [("q_b", 24576, 1536), ("kv_b", 32768, 512), ("o", 7168, 16384), ("expert gate/up", 2048, 7168),
         ("expert down", 7168, 2048), ("dense MLP up", 18432, 7168), ("dense MLP down", 7168, 18432)]
SMOKE_GEMMS = [("q_b", 192, 160), ("o", 130, 256)]
MS = (1, 16, 128, 4096)


def timer(device: torch.device):
    """ms per call: triton's do_bench on a GPU; one plain call under the interpreter (--smoke)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50)

    def once(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return once


def random_fp8(shape, device) -> torch.Tensor:
    """Random e4m3fn bytes without the NaN patterns, made on the device (fast even for 11 GB of experts)."""
    b = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    b = torch.where((b & 0x7F) == 0x7F, b ^ 0x01, b)
    return b.view(FN)


def block_scales(n, k, device, lead=()) -> torch.Tensor:
    return torch.rand(*lead, -(-n // 128), -(-k // 128), device=device) * 1e-3 + 1e-3


def run_tests(device) -> str:
    if device.type != "cuda":
        return "kernel tests: skipped (--smoke)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                        "tests/backends/triton/test_triton_kernels.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=False)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(r.stdout[-3000:], file=sys.stderr)
    return f"kernel tests on this GPU (`pytest tests/backends/triton/test_triton_kernels.py -k cuda`): {last}"


def copy_bandwidth(device, bench) -> float:
    n = (1 << 30) if device.type == "cuda" else (1 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * n / (ms * 1e-3) / 1e9  # read + write


def scaled_mm_block(q, s, w, ws):
    """torch._scaled_mm with (1x128, 128x128) scaling, if this torch/GPU does it; else raises. cuBLAS's blockwise
    path wants M a multiple of 4 (rows padded here) and the 1x128 activation scale outer-dim-major (strides
    (1, M)); ../shared/gpu/h200-e5d6eba.md has the rules and the refusal seen without them."""
    pad = (-q.shape[0]) % 4
    if pad:
        q = torch.cat([q.view(torch.uint8), q.new_zeros(pad, q.shape[1]).view(torch.uint8)]).view(q.dtype)
        s = torch.cat([s, s.new_ones(pad, s.shape[1])])
    out = torch._scaled_mm(q, w.t(), scale_a=s.t().contiguous().t(), scale_b=ws.t(), out_dtype=torch.bfloat16)
    return out[: out.shape[0] - pad]


def gemm_table(device, bench, shapes, ms, copy_gbs: float) -> str:
    from dsv3.backends.cuda.act_quant import act_quant
    from dsv3.backends.cuda.fp8_gemm import fp8_gemm

    first_error = []
    rows = ["| layer | M | N | K | dsv3 FP8 TFLOP/s | GEMM only | BF16 matmul | _scaled_mm blockwise | FP8 / BF16 | "
            "us (x one read of the FP8 weight) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, n, k in shapes:
        w, ws = random_fp8((n, k), device), block_scales(n, k, device)
        wb = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            q, s = act_quant(x, FN, 448.0)
            flop = 2 * m * n * k
            t_ours = bench(lambda: fp8_gemm(*act_quant(x, FN, 448.0), w, ws))  # noqa: B023
            t_gemm = bench(lambda: fp8_gemm(q, s, w, ws))  # noqa: B023
            t_bf16 = bench(lambda: x @ wb.T)  # noqa: B023
            try:
                scaled_mm_block(q, s, w, ws)
                scaled = f"{flop / bench(lambda: scaled_mm_block(q, s, w, ws)) / 1e9:.1f}"  # noqa: B023
            except Exception as e:  # unsupported scaling on this torch/GPU
                scaled = f"n/a ({type(e).__name__})"
                first_error = first_error or [f"\n\n_scaled_mm: {type(e).__name__}: {str(e).splitlines()[0][:300]}"]
            tf = lambda t: f"{flop / t / 1e9:.1f}"  # noqa: E731  ms -> TFLOP/s
            read_ms = n * k / (copy_gbs * 1e9) * 1e3  # the weight's bytes at the measured copy rate
            rows.append(f"| {name} | {m} | {n} | {k} | {tf(t_ours)} | {tf(t_gemm)} | {tf(t_bf16)} | {scaled} | "
                        f"{t_bf16 / t_ours:.2f}x | {t_ours * 1e3:.1f} ({t_ours / read_ms:.1f}x) |")
            print(rows[-1], file=sys.stderr)
    return "\n".join(rows) + "".join(first_error)


def tune_space(m: int) -> list:
    """Candidate launches for M rows: tiles no taller than needed, split-K only where M is small."""
    from dsv3.backends.cuda.launch import GemmConfig

    splits = (1, 0, 2, 4) if m <= 64 else (1, 0)
    return [GemmConfig(bm, bn, w, st, split_k=sk) for bm in (16, 32, 64, 128) if bm <= max(16, 2 * m)
            for bn in (64, 128, 256) for w in (4, 8) for st in (3, 4) for sk in splits]


def tune_shapes(smoke: bool, tps) -> dict:
    """{"NxK": layer names} for every FP8 linear of DeepSeek-V3 at the given tensor-parallel sizes."""
    from dsv3.backends.cuda.launch import v3_linear_shapes

    if smoke:
        return {f"{n}x{k}": name for name, n, k in SMOKE_GEMMS}
    shapes: dict = {}
    for tp in tps:
        for name, (n, k) in v3_linear_shapes(tp).items():
            shapes.setdefault(f"{n}x{k}", []).append(f"{name} tp{tp}")
    return {key: ", ".join(names) for key, names in shapes.items()}


def tune_table(device, bench, shapes: dict, ms, target: str, out: Path | None) -> str:
    """Best launch per (shape, M bucket) against the table's choice; with `out`, the file for this GPU:
    the current table with the measured entries added (benchmarks run only where they beat the table)."""
    import json

    from dsv3.backends.cuda.act_quant import act_quant
    from dsv3.backends.cuda.fp8_gemm import fp8_gemm
    from dsv3.backends.cuda.launch import arch_of, check_config, gemm_config, load_table, table_json

    table = load_table(target, arch_of(device))
    entries = {shape: dict(buckets) for shape, buckets in table.gemm.items()}
    rows = ["| shape (N x K) | layers | M | table config | table TFLOP/s | best config | best TFLOP/s |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    c = lambda g: f"{g.block_m}x{g.block_n} w{g.num_warps} s{g.num_stages} k{g.split_k or 'auto'}"  # noqa: E731
    for shape, names in shapes.items():
        n, k = (int(v) for v in shape.split("x"))
        w, ws = random_fp8((n, k), device), block_scales(n, k, device)
        for m in ms:
            q, s = act_quant(torch.randn(m, k, device=device, dtype=torch.bfloat16), FN, 448.0)
            flop = 2 * m * n * k
            current = gemm_config(m, target, n, k, device)
            t_table = bench(lambda: fp8_gemm(q, s, w, ws, config=current))  # noqa: B023
            best = (t_table, current)
            for cfg in tune_space(m):
                try:
                    check_config(cfg, table.smem_bytes, "candidate")
                    t = bench(lambda: fp8_gemm(q, s, w, ws, config=cfg))  # noqa: B023
                except Exception:  # too large for this chip's shared memory: not a candidate
                    continue
                best = min(best, (t, cfg), key=lambda p: p[0])
            if best[1] != current:
                entries.setdefault(shape, {})[m] = best[1]
            rows.append(f"| {shape} | {names} | {m} | {c(current)} | {flop / t_table / 1e9:.1f} | {c(best[1])} | "
                        f"{flop / best[0] / 1e9:.1f} |")
            print(rows[-1], file=sys.stderr)
    if out is not None:
        tuned = type(table)(table.arch, table.sms, table.smem_bytes,
                            {shape: tuple(sorted(b.items())) for shape, b in entries.items()}, table.moe, table.attention)
        about = (f"Launch configs for {table.arch}, tuned by `python benchmarks/gpu_kernels.py --tune` on "
                 f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the interpreter (smoke)'}.")
        out.write_text(json.dumps(table_json(tuned, about), indent=1) + "\n")
        rows.append(f"\nWrote {out}.")
    return "\n".join(rows)


def moe_table(device, bench, experts, dim, inter, k, token_counts, copy_gbs: float) -> str:
    from dsv3.backends.cuda.act_quant import act_quant
    from dsv3.backends.cuda.fp8_gemm import fp8_gemm
    from dsv3.backends.cuda.moe import fused_moe

    w1, w3 = random_fp8((experts, inter, dim), device), random_fp8((experts, inter, dim), device)
    w2 = random_fp8((experts, dim, inter), device)
    s1, s3 = block_scales(inter, dim, device, (experts,)), block_scales(inter, dim, device, (experts,))
    s2 = block_scales(dim, inter, device, (experts,))

    def loop(x, weights, ids):
        """The same kernels, one expert at a time from Python (what the fused launch replaces)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=device)
        flat = ids.flatten()
        for e in flat.unique().tolist():
            rows = (flat == e).nonzero().squeeze(1)
            tok = rows // k
            lin = lambda h, w, s: fp8_gemm(*act_quant(h, FN, 448.0), w, s)  # noqa: E731
            h = x[tok]
            g, u = lin(h, w1[e], s1[e]), lin(h, w3[e], s3[e])
            y = lin(torch.nn.functional.silu(g) * u, w2[e], s2[e])
            out.index_add_(0, tok, y.float() * weights.flatten()[rows, None])
        return out.to(x.dtype)

    rows = ["| tokens | fused ms | per-expert loop ms | speedup | active expert bytes / time (of copy bandwidth) | "
            "TFLOP/s |", "| --- | --- | --- | --- | --- | --- |"]
    for t in token_counts:
        x = torch.randn(t, dim, device=device, dtype=torch.bfloat16)
        ids = torch.rand(t, experts, device=device).topk(k, dim=-1).indices
        weights = torch.rand(t, k, device=device)
        t_fused = bench(lambda: fused_moe(x, weights, ids, w1, s1, w3, s3, w2, s2, 0, 448.0))  # noqa: B023
        t_loop = bench(lambda: loop(x, weights, ids))  # noqa: B023
        active = len(ids.unique()) * 3 * inter * dim  # FP8 bytes of the experts this batch routes to
        gbs = active / (t_fused * 1e-3) / 1e9
        tflops = 2 * 3 * t * k * inter * dim / (t_fused * 1e-3) / 1e12
        rows.append(f"| {t} | {t_fused:.3f} | {t_loop:.3f} | {t_loop / t_fused:.1f}x | {gbs:.0f} GB/s "
                    f"({gbs / copy_gbs:.0%}) | {tflops:.1f} |")
        print(rows[-1], file=sys.stderr)
    return "\n".join(rows)


def mla_table(device, bench, copy_gbs, heads, cases) -> str:
    from dsv3.backends.cuda.mla_decode import mla_decode

    rows = [f"| batch | cached tokens | ms | GB/s read | of copy bandwidth ({copy_gbs:.0f} GB/s) |",
            "| --- | --- | --- | --- | --- |"]
    C, R = (512, 64) if device.type == "cuda" else (64, 16)
    for b, t in cases:
        kv = torch.randn(b, t, C, device=device, dtype=torch.bfloat16)
        pe = torch.randn(b, t, R, device=device, dtype=torch.bfloat16)
        ql = torch.randn(b, 1, heads, C, device=device, dtype=torch.bfloat16)
        qp = torch.randn(b, 1, heads, R, device=device, dtype=torch.bfloat16)
        ms = bench(lambda: mla_decode(ql, qp, kv, pe, 0.1, None))  # noqa: B023
        gbs = (kv.numel() + pe.numel()) * 2 / (ms * 1e-3) / 1e9
        rows.append(f"| {b} | {t} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.0%} |")
        print(rows[-1], file=sys.stderr)
    return "\n".join(rows)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--tune", action="store_true",
                    help="also sweep the FP8 GEMM's launch configs at every DeepSeek-V3 linear shape and M bucket and "
                         "write this GPU's config file (dsv3/backends/cuda/configs/<vendor>-<arch>.json)")
    ap.add_argument("--tune-tp", default="1,8,16", help="tensor-parallel sizes whose shapes --tune sweeps")
    ap.add_argument("--tune-m", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096",
                    help="M buckets --tune sweeps (fewer: a shorter run)")
    ap.add_argument("--tune-out", type=Path, default=None,
                    help="where --tune writes the config file (default: the package's file for this GPU; "
                         "under --smoke nothing unless given)")
    ap.add_argument("--tune-only", action="store_true", help="with --tune: skip the tests and the tables")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 on CPU; writes nothing")
    args = ap.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
        device = torch.device("cpu")
    elif torch.cuda.is_available() and not getattr(torch.version, "hip", None):
        device = torch.device("cuda")
    else:
        sys.exit("no NVIDIA GPU here: nothing to time (use --smoke with TRITON_INTERPRET=1 to check the script)")
    bench = timer(device)
    start = time.time()
    smoke = args.smoke
    copy_gbs = copy_bandwidth(device, bench)
    tests = gemm = moe = mla = "(skipped: --tune-only)"
    if not (args.tune and args.tune_only):
        tests = run_tests(device)
        gemm = gemm_table(device, bench, SMOKE_GEMMS if smoke else GEMMS, (1, 3) if smoke else MS, copy_gbs)
        moe = moe_table(device, bench, *((8, 256, 128, 2, (1, 5)) if smoke else (256, 7168, 2048, 8, MS)), copy_gbs)
        mla = mla_table(device, bench, copy_gbs, 4 if smoke else 128,
                        [(1, 70)] if smoke else [(1, 4096), (1, 32768), (32, 4096), (128, 2048)])
    tune = ""
    if args.tune:
        from dsv3.backends.cuda.launch import CONFIG_DIR, arch_of

        out = args.tune_out or (None if smoke else CONFIG_DIR / f"nvidia-{arch_of(device)}.json")
        shapes = tune_shapes(smoke, [int(v) for v in args.tune_tp.split(",")])
        ms = (1, 3) if smoke else tuple(int(v) for v in args.tune_m.split(","))
        tune = "\n\n### GEMM launch configs: the table's against the best found\n\n" + tune_table(
            device, bench, shapes, ms, "nvidia", out)
    name = "CPU (Triton interpreter, smoke)" if smoke else torch.cuda.get_device_name(device)
    import triton

    body = (f"GPU: {name}; torch {torch.__version__}, triton {triton.__version__}; {time.time() - start:.0f} s in all.\n\n"
            f"{tests}\n\nCopy bandwidth (read + write): {copy_gbs:.0f} GB/s.\n\n"
            f"### FP8 GEMM (act_quant + block-scaled GEMM, BF16 out)\n\n{gemm}\n\n"
            f"### Fused MoE vs a per-expert loop\n\n{moe}\n\n### MLA decode (absorbed, bf16 latent cache)\n\n{mla}{tune}\n")
    print(body)
    if not (args.no_write or smoke):
        command = "python benchmarks/gpu_kernels.py" + (" --tune" if args.tune else "")
        append_section("GPU kernels (issues 5, 13)", command, body)


if __name__ == "__main__":
    main()
