"""Per-rank resident weight memory and decode tokens/s for N = 1, 2 processes on the cpu backend.

On 2 cores this shows memory scaling, not speed. Runs torchrun on gloo; the model is the ~280M
benchmark checkpoint in the released FP8 layout, loaded in bf16.

    python benchmarks/tp_memory.py [--workdir DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import append_section, bench_checkpoint, parser  # noqa: E402

WORKER = r'''
import json, sys, torch, dsv3
from dsv3.engine import resident_bytes
from dsv3.core.generate import generate
e = dsv3.load(sys.argv[1], backend="cpu", dtype="bf16")
prompt = torch.randint(2, e.cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
generate(e.model, [prompt], 4, eos_ids=())
_, stats = generate(e.model, [prompt], 32, eos_ids=())
out = f"{sys.argv[2]}-rank{e.par.rank}.json"
open(out, "w").write(json.dumps({"rank": e.par.rank, "bytes": resident_bytes(e), "decode": stats.decode_tps}))
'''


def main() -> None:
    args = parser(__doc__).parse_args()
    work, ckpt = bench_checkpoint(args.workdir, "dsv3-tp-bench-")
    script = work / "tp_worker.py"
    script.write_text(WORKER)
    rows = ["| processes | rank | resident weights MB | decode tok/s (batch 1) |", "| --- | --- | --- | --- |"]
    for n in (1, 2):
        prefix = work / f"n{n}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                        str(script), str(ckpt), str(prefix)], capture_output=True, text=True, check=True)
        found = [json.loads(Path(f"{prefix}-rank{r}.json").read_text()) for r in range(n)]
        for d in found:
            rows.append(f"| {n} | {d['rank']} | {d['bytes'] / 1e6:.0f} | {d['decode']:.1f} |")
    text = "\n".join(rows + ["", "BENCH_280M, bf16, gloo on one 2-core machine: the ranks share the cores, so "
                             "speed does not scale here; memory per rank is the point (embedding, head, attention "
                             "heads, MLP widths and experts split; norms, wq_a/wkv_a and the gate replicated)."])
    print(text)
    if not args.no_write:
        append_section("Tensor-parallel memory per rank (issue 4)", "python benchmarks/tp_memory.py", text)


if __name__ == "__main__":
    main()
