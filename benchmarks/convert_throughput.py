"""dsv3 convert dequant / reshard against `cp -r` and a plain `safetensors` script, with peak RSS.

Side by side in one run on the ~280M-parameter, 8-shard FP8 checkpoint: throughput as a fraction
of cp's bytes/s (input bytes per second), each command's peak RSS against the largest input
shard and the interpreter's own baseline (python importing torch and dsv3), and dsv3 dequant
(validation and checksums included) against the conversion a user writes with the safetensors
library (benchmarks/safetensors_dequant.py): best of 3 for both, alternated. Peak RSS is the
child's ru_maxrss, the same figure `/usr/bin/time -v` prints as "Maximum resident set size".

    python benchmarks/convert_throughput.py [--workdir DIR]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import append_section, bench_checkpoint, parser  # noqa: E402


def run(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one child process, measured in a fresh wrapper process so
    ru_maxrss covers that command alone."""
    wrapper = ("import resource, subprocess, sys, time\n"
               "t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True)\n"
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    secs, kib = out.stdout.split()
    return float(secs), int(kib) * 1024


def main() -> None:
    args = parser(__doc__).parse_args()
    work, src = bench_checkpoint(args.workdir, "dsv3-convert-bench-")
    shards = sorted(src.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    py = [sys.executable, "-m", "dsv3"]
    results = {}
    script = [sys.executable, str(Path(__file__).parent / "safetensors_dequant.py"), str(src)]
    jobs = [
        ("cp -r", ["cp", "-r", str(src)], work / "cp", []),
        ("dsv3 convert dequant (bf16)", [*py, "convert", "dequant", str(src)], work / "bf16", ["--quiet"]),
        ("safetensors script dequant (bf16)", script, work / "st", []),
        ("dsv3 convert reshard --model-parallel 2 --dtype bf16", [*py, "convert", "reshard", str(src)], work / "mp2",
         ["--quiet", "--model-parallel", "2", "--dtype", "bf16"]),
        ("dsv3 convert reshard --model-parallel 2 (fp8)", [*py, "convert", "reshard", str(src)], work / "mp2fp8",
         ["--quiet", "--model-parallel", "2"]),
    ]
    for repeat in range(3):  # alternated, best of 3: the machine is shared and noisy
        for label, cmd, dst, extra in jobs:
            if repeat and label not in ("dsv3 convert dequant (bf16)", "safetensors script dequant (bf16)"):
                continue
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["sync"])
            secs, rss = run([*cmd, str(dst), *extra])
            out_bytes = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
            if label not in results or secs < results[label][0]:
                results[label] = (secs, rss, out_bytes)
            shutil.rmtree(dst, ignore_errors=True)
    startup, base_rss = run([sys.executable, "-c", "import torch, dsv3.convert"])
    cp_rate = total / results["cp -r"][0]
    rows = ["| command | seconds | input MB/s | fraction of cp | fraction of cp after startup | peak RSS MB | "
            "RSS - baseline, in largest shards |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, (secs, rss, out_bytes) in results.items():
        rate = total / secs
        over = (rss - base_rss) / largest if "cp" not in label else float("nan")
        steady = "" if "cp" in label else f"{total / max(secs - startup, 1e-9) / cp_rate:.2f}"
        rows.append(f"| {label} | {secs:.2f} | {rate / 1e6:.0f} | {rate / cp_rate:.2f} | {steady} | {rss / 1e6:.0f} | "
                    f"{'' if 'cp' in label else f'{over:.2f}'} |")
    ours, theirs = results["dsv3 convert dequant (bf16)"][0], results["safetensors script dequant (bf16)"][0]
    rows += ["", f"dsv3 dequant vs the safetensors script: {ours:.2f} s vs {theirs:.2f} s = **{theirs / ours:.2f}x** its "
             "speed (target >= 1.0: validation, FP8 NaN checks and sha256 checksums included)."]
    notes = [f"Input: BENCH_280M in the released FP8 layout, {len(shards)} shards, {total / 1e6:.0f} MB, "
             f"largest shard {largest / 1e6:.0f} MB. Interpreter baseline (python + torch + dsv3.convert): "
             f"{base_rss / 1e6:.0f} MB peak RSS, {startup:.2f} s (the startup every command pays; the next-to-last "
             "column leaves it out, as a 690 GB conversion would). Targets: RSS under baseline + 2 x largest shard; dequant at "
             "least as fast as the safetensors script (issue 16; issue 3's 0.5 of cp is out of reach, see its note). "
             "Page cache is warm for every command (cp reads the same files); writes are the noisy part (dirty-page "
             "writeback), hence best of 3, alternated.",
             f"Machine: {os.cpu_count()} cores."]
    text = "\n".join(rows + [""] + notes)
    print(text)
    if not args.no_write:
        append_section("Conversion throughput and memory (issues 3, 16)", "python benchmarks/convert_throughput.py", text)


if __name__ == "__main__":
    main()
