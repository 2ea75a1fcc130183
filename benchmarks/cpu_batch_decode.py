"""Batched greedy decode on the cpu backend where the CPU has AMX tiles: linears and dense MLPs of a few rows on tiles
(native.linear_amx / mlp_amx, from ops.AMX_DECODE_ROWS rows) against the C kernels' AVX512-BF16 dot products alone,
side by side in one run.

An AMX Xeon issues an AVX512-BF16 pair dot product about once per 3 cycles, so the C kernel's cost per weight grows
with the rows a step carries; a tile product costs the same for 1-16 rows. Per batch size: decode tokens/s (all rows'
new tokens after the first, over the decode loop's time) with tiles and without, bf16 model, FP8 weights, 32-token
prompts, the two modes interleaved, best of each. Models: BENCH_280M (dense MLP, attention and a large head are most
of its bytes) and V3_SHAPED (benchmarks/speculative.py: routed experts are most of its bytes, and at these batches
they take one row each, so they stay on the C kernel).

    python benchmarks/cpu_batch_decode.py [--new-tokens 32] [--repeats 3] [--workdir DIR] [--no-write]
    python benchmarks/cpu_batch_decode.py --smoke     # the demo model, two batches (the test suite runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import results as R  # noqa: E402
from speculative import V3_SHAPED  # noqa: E402


def rate(engine, prompts, new: int) -> float:
    """Decode tokens/s of one greedy call (the prompt's prefill and any capture left out)."""
    engine.generate(prompts, max_new_tokens=new)
    st = engine.last_stats
    return (st.decode_tokens - len(prompts)) / max(st.decode_s, 1e-9)


def main() -> None:
    ap = R.parser(__doc__)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="the demo model, batches 1 and 8: checks the script runs")
    args = ap.parse_args()
    import dsv3
    from dsv3.backends.cpu import native, ops
    from dsv3.synthetic import BENCH_280M, DEMO

    lib = native.load()
    if lib is None or not lib.amx:
        print(f"cpu_batch_decode: this CPU's build is {lib.isa if lib else 'none'}, without AMX tiles: nothing to "
              "compare (decode runs on the C kernels alone)")
        return
    models = (("BENCH_280M", BENCH_280M), ("V3_SHAPED", {**BENCH_280M, **V3_SHAPED}))
    batches = (1, 2, 4, 8, 16)
    if args.smoke:
        models, batches, args.new_tokens, args.repeats, args.no_write = (("DEMO", DEMO),), (1, 8), 4, 1, True
    tiles_from = ops.AMX_DECODE_ROWS
    modes = {"tiles": tiles_from, "C kernel": ops.BF16DOT_ROWS}  # the C kernel alone: tiles never reached
    rows = ["| model | batch | C kernel alone (tok/s) | tiles from "
            f"{tiles_from} rows (tok/s) | tiles / C kernel |", "| --- | --- | --- | --- | --- |"]
    for name, cfg in models:
        path = R.synthetic_checkpoint((args.workdir or Path("/tmp/dsv3-batch-decode")) / name, cfg, n_shards=4)
        engine = dsv3.load(path, backend="cpu", dtype="bf16")
        for B in batches:
            prompts = [[(37 * i + 11 * b) % (cfg["vocab_size"] - 2) + 1 for i in range(32)] for b in range(B)]
            best = dict.fromkeys(modes, 0.0)
            try:
                for _ in range(args.repeats):
                    for mode, start in modes.items():
                        ops.AMX_DECODE_ROWS = start
                        engine.release()  # the other mode's recorded steps hold the other kernels' calls
                        engine.generate(prompts, max_new_tokens=2)  # its step recorded, out of the timing
                        best[mode] = max(best[mode], rate(engine, prompts, args.new_tokens))
            finally:
                ops.AMX_DECODE_ROWS = tiles_from
            c, t = best["C kernel"], best["tiles"]
            rows.append(f"| {name} | {B} | {c:.1f} | {t:.1f} | **{t / c:.2f}x** |")
            print(rows[-1], flush=True)
        del engine
    text = "\n".join(rows + ["", f"cpu backend, bf16 model, FP8 weights, greedy, 32-token prompts, {args.new_tokens} new "
                             f"tokens, best of {args.repeats}, the two modes interleaved (each re-records its step); "
                             f"decode steps only (prefill and capture left out); torch threads "
                             f"{torch.get_num_threads()}; {R.cpu_line()}. A batch pads to its bucket (1, 2, 4, 8, 16): "
                             "the rows a step carries. Below the tiles' start both columns run the same kernels: "
                             "their ratio is this machine's noise."])
    print(text)
    if not args.no_write:
        R.append_section("Batched decode on AMX tiles, cpu", "python benchmarks/cpu_batch_decode.py", text)


if __name__ == "__main__":
    main()
