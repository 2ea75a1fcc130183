"""Compile every Triton launch of the cuda and rocm backends for real GPUs, on a machine without one.

The interpreter runs the kernels' Python, not the GPU compiler: a tile that overflows shared memory, a dot
shape or dtype the tensor cores refuse, a construct the compiler rejects pass under it and fail on the GPU
(the first H200 run found an fp32 MLA tile of 244 KB that way). This script closes that gap before a GPU
session spends its minutes on it:

1. record (a subprocess per chip, under TRITON_INTERPRET=1): the backend runs as it would on the chip (its FP8
   mode, its launch table, SMs and shared memory) and every distinct launch is recorded: kernel, argument
   dtypes and 16-byte alignment, integer specializations, constexprs, warps and stages. Two workloads: the
   demo model end to end (prefill, decode steps at batch 1 and 2, MTP verify steps; kernels executed), and
   each op at DeepSeek-V3's own shapes (tensor parallel 1/8/16, M from 1 to 4096, recorded without running).
2. compile (a subprocess without the interpreter): each launch through Triton's compiler for the chip's
   target (ptxas for NVIDIA, the AMDGPU backend for AMD, both bundled with the triton wheel), and its shared
   memory checked against the chip's limit, as the driver would at launch; registers per thread and spills to
   local memory (ptxas' on NVIDIA, the AMDGPU metadata on AMD): a spilling kernel is slow however well it fits.

    python benchmarks/gpu_compile.py [--chips sm90,sm89,sm80,gfx942,gfx950,gfx90a] [--no-write]
    python benchmarks/gpu_compile.py --smoke --chips sm90     # the demo model only (what the test suite runs)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from results import append_section  # noqa: E402


@dataclass(frozen=True)
class Chip:
    name: str
    backend: str  # the dsv3 backend that runs on it
    target: tuple  # triton GPUTarget(backend, arch, warp size)
    sms: int
    smem: int  # shared memory (LDS) one block may use, bytes
    example: str
    env: dict = field(default_factory=dict)  # what makes the backend take this chip's mode under the interpreter


CHIPS = {c.name: c for c in (
    Chip("sm90", "cuda", ("cuda", 90, 32), 132, 232448, "H100/H200"),
    Chip("sm89", "cuda", ("cuda", 89, 32), 142, 101376, "L40S", {"DSV3_CUDA_CAPABILITY": "8.9"}),
    Chip("sm80", "cuda", ("cuda", 80, 32), 108, 166912, "A100, BF16 mode", {"DSV3_CUDA_CAPABILITY": "8.0"}),
    Chip("gfx942", "rocm", ("hip", "gfx942", 64), 304, 65536, "MI300X", {"DSV3_ROCM_ARCH": "gfx942"}),
    Chip("gfx950", "rocm", ("hip", "gfx950", 64), 256, 163840, "MI355X", {"DSV3_ROCM_ARCH": "gfx950"}),
    Chip("gfx90a", "rocm", ("hip", "gfx90a", 64), 110, 65536, "MI250X, BF16 mode", {"DSV3_ROCM_ARCH": "gfx90a"}),
)}


# ---- 1. record (under the interpreter) -------------------------------------------------------------------
def _value(v, constexpr: bool):
    """A launch argument as JSON: tensors by dtype and alignment, integers as they specialize."""
    import torch

    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if constexpr or v is None or isinstance(v, (bool, str)):
        return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)
    if isinstance(v, int):  # what Triton specializes on: 1, a multiple of 16, and 32 vs 64 bits
        return {"int": 1 if v == 1 else 16 if v % 16 == 0 else 3, "wide": not -2**31 <= v < 2**31}
    if isinstance(v, float):
        return {"float": True}
    raise TypeError(f"launch argument {v!r} of type {type(v).__name__}")


class Recorder:
    """Patches the interpreter's launch: each distinct launch is kept; with execute=False nothing runs."""

    def __init__(self, coarse: bool = False):
        self.launches: dict[str, dict] = {}
        self.execute = True
        self.coarse = coarse  # one launch per kernel, dtypes and constexprs (integer and alignment variants folded)

    def install(self):
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.add(fn, args, kwargs)
            if recorder.execute:
                return original(fn, *args, grid=grid, warmup=warmup, **kwargs)
        InterpretedFunction.run = run

    def add(self, fn, args, kwargs):
        params = inspect.signature(fn.fn).parameters
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        entry = {"module": fn.fn.__module__, "kernel": fn.fn.__qualname__,
                 "args": {k: _value(bound.get(k, p.default), "constexpr" in str(p.annotation))
                          for k, p in params.items()},
                 "options": {k: v for k, v in kwargs.items() if k not in params}}
        key = entry
        if self.coarse:
            key = {**entry, "args": {k: v["tensor"] if isinstance(v, dict) and "tensor" in v else
                                     None if isinstance(v, dict) else v for k, v in entry["args"].items()}}
        self.launches.setdefault(json.dumps(key, sort_keys=True), entry)


def simulate(chip: Chip):
    """Make the launch tables answer as on `chip` (its file, SMs and shared memory) while tensors stay on the CPU,
    and the row-wise kernels take one token per program, as there."""
    import dsv3.backends.cuda.launch as launch

    launch.INTERPRETER_ROWS = 1

    vendor = "nvidia" if chip.backend == "cuda" else "amd"
    table = replace(launch.load_table(vendor, chip.name), sms=chip.sms, smem_bytes=chip.smem)
    launch.load_table = lambda target, arch=None: table  # table_for and sm_count read it at each call


def model_workload(workdir: Path, backend: str, smoke: bool) -> None:
    """The demo model end to end: a prefill of two prompts, MTP verify rounds of 2 (and 3) tokens a row at batch 2
    (and the adaptive mode's probes at batch 1), decode steps at batch 1 (fixed-shape; and eager, at batch 2 and in
    fp32, without smoke). The rounds draft whatever the random MTP layer says (adaptive off: with it on, drafts
    that never land would stop drafting before a verify step ran). The smoke run is the fewest calls that still
    make every distinct bf16 launch of the full model workload (one of each kernel, dtypes and constexprs: its decode
    steps at batch 2 and its probes launch what the verify rounds at batch 2 do)."""
    import dsv3
    from dsv3.core.speculative import speculative_generate
    from dsv3.synthetic import DEMO, write_checkpoint

    path = workdir / "demo"
    if not (path / "config.json").is_file():
        write_checkpoint(path, DEMO, seed=0)
    prompts = [[5, 9, 2, 7, 11], list(range(3, 14))]
    for dtype in ("bf16",) if smoke else ("bf16", "fp32"):
        engine = dsv3.load(path, backend=backend, device="cpu", dtype=dtype)
        if dtype == "bf16":
            for k in (1,) if smoke else (1, 2):
                speculative_generate(engine.model, prompts, max_new_tokens=2 if smoke else 4, draft_tokens=k,
                                     adaptive=False)
                if not smoke:  # as users run it: adaptive, its probes' drafts one token at a time
                    engine.generate(prompts[:1], max_new_tokens=4, ignore_eos=True, speculative="mtp", draft_tokens=k)
        for static in (True,) if smoke else (False, True):  # the eager step and the fixed-shape (graph) step
            for batch in (prompts[:1],) if smoke or dtype == "fp32" else (prompts[:1], prompts):
                engine.generate(batch, max_new_tokens=2 if smoke else 3, ignore_eos=True, static=static)


def v3_workload(backend: str) -> None:
    """Each op once per DeepSeek-V3 shape it meets (tensor parallel 1/8/16) and M bucket, not run: the launch
    configs of the real model's shapes, big tiles and all. Few experts stand in for 256 (their count is a
    runtime argument, not part of a compiled kernel)."""
    import torch

    from dsv3.backends import get_class
    from dsv3.backends.cuda.launch import V3_EXPERTS, V3_TP, attn_config, v3_linear_shapes
    from dsv3.core.kernels import ExpertWeights, GateParams

    k = get_class(backend)("cpu")
    fp8 = k.fp8_dtype
    ms = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    bf = torch.bfloat16

    def weight(n, kk):
        if fp8 is None:
            return torch.empty(n, kk, dtype=bf), None
        return torch.empty(n, kk, dtype=fp8), torch.ones(-(-n // 128), -(-kk // 128))

    shapes = {shape for tp in V3_TP for shape in v3_linear_shapes(tp).values()}
    for n, kk in sorted(shapes):
        w, s = weight(n, kk)
        for m in ms:
            x = torch.empty(m, kk, dtype=bf)
            k.linear(x, w, s)
            if m <= 64:
                k.linear_add(x, w, s, torch.empty(m, n, dtype=bf))
    for n, kk in ((2048, 7168), (18432 // 8, 7168)):  # shared expert and a dense MLP on 8 ranks: gate + up in one
        w1, s1 = weight(n, kk)
        w2, s2 = weight(kk, n)
        for m in (1, 4, 32, 64):
            k.mlp(torch.empty(m, kk, dtype=bf), w1, w2, w1, s1, s2, s1)
    (inter, dim), e, top = V3_EXPERTS["expert w1/w3"], 8, 8
    w1, s1 = weight(e * inter, dim)
    w2, s2 = weight(e * dim, inter)
    s13 = None if s1 is None else s1.view(e, -1, s1.shape[1])
    experts = ExpertWeights(w1=w1.view(e, inter, dim), w3=w1.view(e, inter, dim), w2=w2.view(e, dim, inter), s1=s13,
                            s3=s13, s2=None if s2 is None else s2.view(e, -1, s2.shape[1]), first=0, total=256)
    for t in (1, 2, 4, 8, 16, 32, 64, 128, 512, 4096):
        ids = torch.randint(0, e, (t, top))
        k.moe_experts(torch.empty(t, dim, dtype=bf), torch.rand(t, top), ids, experts)
    gate = GateParams(top_k=8, n_group=8, topk_group=4, scoring_func="sigmoid", route_scale=2.5,
                      norm_topk_prob=True, group_score="top2_sum")
    for t in (1, 32, 4096):
        k.moe_gate(torch.empty(t, 7168, dtype=bf), torch.empty(256, 7168, dtype=bf), torch.zeros(256), gate)
    for d in (7168, 1536, 512):
        k.rms_norm(torch.empty(4, d, dtype=bf), torch.ones(d, dtype=bf), 1e-6)
    for heads in (128, 16, 8):  # MLA decode of one rank: 128 heads over TP 1/8/16
        for dtype in (bf, torch.float32):
            if attn_config(k.target, 512, 64, dtype.itemsize) is None:  # the backend takes the reference attention
                continue
            for b, s, t in ((1, 1, 32768), (32, 1, 4096), (128, 1, 2048), (4, 2, 1024)):
                kv, pe = torch.empty(b, t, 512, dtype=dtype), torch.empty(b, t, 64, dtype=dtype)
                q, q_pe = torch.empty(b, s, heads, 512, dtype=dtype), torch.empty(b, s, heads, 64, dtype=dtype)
                last = torch.full((b, s), t - 1, dtype=torch.int64)
                k._mla(q, q_pe, kv, pe, 0.1, None, k.target, last, torch.arange(b))
        q_pe = torch.empty(4, 1, heads, 64, dtype=bf)
        kv_new, k_pe = torch.empty(4, 1, 576, dtype=bf), torch.empty(4, 1, 64, dtype=bf)
        cos, sin = torch.empty(4, 1, 32), torch.empty(4, 1, 32)
        k.mla_latent(q_pe, kv_new[..., :512], k_pe, torch.ones(512, dtype=bf), 1e-6, cos, sin,
                     torch.empty(4, 4096, 512, dtype=bf), torch.empty(4, 4096, 64, dtype=bf),
                     torch.arange(4).view(4, 1), torch.zeros(4, 1, dtype=torch.int64))
    for dtype in (bf, torch.float32):
        k.rope(torch.empty(4, 1, 128, 64, dtype=dtype), torch.empty(4, 1, 32), torch.empty(4, 1, 32))
    if fp8 is not None:
        k.weight_dequant(*weight(2048, 7168), bf)


def record(chip: Chip, out: Path, workdir: Path, smoke: bool) -> None:
    simulate(chip)
    rec = Recorder(coarse=smoke)
    rec.install()
    model_workload(workdir, chip.backend, smoke)
    if not smoke:
        rec.execute = False
        v3_workload(chip.backend)
    out.write_text(json.dumps(list(rec.launches.values())))


# ---- 2. compile (no interpreter) -------------------------------------------------------------------------
class CompileOnly:
    """A stand-in for Triton's active driver: names the chip to compile for and never touches a device."""

    def __init__(self, target, device: int):
        self.target, self.device = target, device

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _argument(v):
    import torch

    if isinstance(v, dict) and "tensor" in v:
        t = torch.empty(64, dtype=getattr(torch, v["tensor"]))
        return t if v["aligned"] else t[1:]
    if isinstance(v, dict) and "int" in v:
        return v["int"] + (2**33 if v["wide"] else 0)
    if isinstance(v, dict) and "float" in v:
        return 0.5
    return v


def _registers(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) as ptxas reports them for one kernel (Triton discards its log):
    a kernel that spills to local memory on the GPU is slow however well its tiles fit."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                              str(src), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def _amd_registers(amdgcn: str) -> tuple[int, int]:
    """(vector registers per lane, vector registers spilled) from the AMDGPU assembly's kernel metadata."""
    regs = re.search(r"\.vgpr_count:\s+(\d+)", amdgcn)
    spills = re.search(r"\.vgpr_spill_count:\s+(\d+)", amdgcn)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def compile_all(chip: Chip, launches: list[dict], registers: bool = True) -> list[dict]:
    """Each launch compiled for the chip: kernel, ok, shared bytes, error, registers and spills (on NVIDIA only with
    `registers`: a second ptxas run per launch)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    driver.set_active(CompileOnly(GPUTarget(*chip.target), device=sorted(CHIPS).index(chip.name)))
    rows = []
    for entry in launches:
        fn = getattr(importlib.import_module(entry["module"]), entry["kernel"])
        args = {k: _argument(v) for k, v in entry["args"].items()}
        if "UPCAST" in args:  # the interpreter's own workaround (it multiplies bf16 as integers); a GPU never sets it
            args["UPCAST"] = False
        row = {"kernel": entry["kernel"], "ok": False, "shared": None, "error": None,
               "constexprs": {k: v for k, v in entry["args"].items() if not isinstance(v, dict)},
               "options": entry["options"]}
        try:
            compiled = fn.warmup(grid=(1,), **args, **entry["options"])
            row["shared"] = compiled.metadata.shared
            if chip.backend == "cuda" and registers:
                row["registers"], row["spills"] = _registers(compiled.asm["ptx"], chip.target[1])
            elif chip.backend == "rocm":  # the AMDGPU backend writes them into the kernel's metadata
                row["registers"], row["spills"] = _amd_registers(compiled.asm["amdgcn"])
            if compiled.metadata.shared > chip.smem:
                row["error"] = f"needs {compiled.metadata.shared} bytes of shared memory; {chip.name} has {chip.smem}"
            else:
                row["ok"] = True
        except Exception as e:  # a compiler error: the message's last line names it
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
            row["error"] = f"{type(e).__name__}: {lines[-1][:300]}"
        rows.append(row)
    return rows


# ---- driver -----------------------------------------------------------------------------------------------
def _subprocess(args: list[str], interpret: bool, env_extra: dict, python: str = sys.executable) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra, PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([python, __file__, *args], env=env, cwd=ROOT, check=False)
    if r.returncode:
        raise SystemExit(f"gpu_compile: {' '.join(args[:2])} failed (exit {r.returncode}); see above")


def summarize(chip: Chip, rows: list[dict]) -> tuple[str, list[str]]:
    kernels: dict[str, list] = {}
    for r in rows:
        kernels.setdefault(r["kernel"], []).append(r)
    cells = []
    for name, rs in sorted(kernels.items()):
        shared = max((r["shared"] or 0) for r in rs)
        regs = ""
        if any("registers" in r for r in rs):
            spills = sum(1 for r in rs if r.get("spills"))
            regs = f", <= {max(r.get('registers', 0) for r in rs)} registers"
            regs += f", {spills} spilling" if spills else ""
        cells.append(f"{name} {sum(r['ok'] for r in rs)}/{len(rs)} (max {shared / 1024:.0f} KB{regs})")
    failures = sorted({f"- {chip.name} `{r['kernel']}` {r['constexprs']} {r['options']}: {r['error']}"
                       for r in rows if not r["ok"]})
    ok = sum(r["ok"] for r in rows)
    line = (f"| {chip.name} ({chip.example}) | {chip.smem // 1024} KB | {ok}/{len(rows)} | "
            f"{max((r['shared'] or 0) for r in rows) / 1024:.0f} KB | {'; '.join(cells)} |")
    return line, failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", default=",".join(CHIPS), help=f"comma-separated, of {', '.join(CHIPS)}")
    ap.add_argument("--smoke", action="store_true", help="the demo model's launches only (no DeepSeek-V3 shapes, no "
                    "fp32), one per kernel, dtypes and constexprs")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    ap.add_argument("--workdir", type=Path, default=None, help="where the demo checkpoint and launch lists go")
    ap.add_argument("--compile-with", metavar="PYTHON", default=sys.executable,
                    help="the Python whose Triton compiles (e.g. a venv with the Triton version of your GPU image: "
                    "launches are recorded with this one's interpreter, compiled with that one's compilers)")
    ap.add_argument("--record", nargs=2, metavar=("CHIP", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--compile", nargs=3, metavar=("CHIP", "IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.record:
        return record(CHIPS[args.record[0]], Path(args.record[1]), args.workdir, args.smoke)
    if args.compile:
        rows = compile_all(CHIPS[args.compile[0]], json.loads(Path(args.compile[1]).read_text()), not args.smoke)
        return Path(args.compile[2]).write_text(json.dumps(rows))
    chips = [c.strip() for c in args.chips.split(",") if c.strip()]
    if unknown := [c for c in chips if c not in CHIPS]:
        raise SystemExit(f"gpu_compile: unknown chip(s) {', '.join(unknown)}; use {', '.join(CHIPS)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsv3-gpu-compile-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        version = subprocess.run([args.compile_with, "-c", "import triton; print(triton.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"gpu_compile: --compile-with {args.compile_with} cannot import triton ({e}); give a Python "
                         "with triton installed (e.g. a venv's bin/python)") from None
    lines, failures = [], []
    for name in chips:
        chip, t0 = CHIPS[name], time.perf_counter()
        recorded, compiled = work / f"{name}-launches.json", work / f"{name}-compiled.json"
        flags = ["--workdir", str(work)] + (["--smoke"] if args.smoke else [])
        _subprocess(["--record", name, str(recorded), *flags], interpret=True, env_extra=chip.env)
        _subprocess(["--compile", name, str(recorded), str(compiled), *flags], interpret=False, env_extra={},
                    python=args.compile_with)
        line, fails = summarize(chip, json.loads(compiled.read_text()))
        lines.append(line)
        failures += fails
        print(f"{name}: {line}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    text = "\n".join(["| chip | shared memory | launches compiled | most shared memory used | per kernel: compiled "
                      "(most shared memory; most registers a thread (AMD: vector registers a lane), launches "
                      "spilling) |",
                      "| --- | --- | --- | --- | --- |", *lines, "",
                      "Every distinct launch of the cuda/rocm backends (the demo model end to end"
                      + ("" if args.smoke else "; each op at DeepSeek-V3's shapes, TP 1/8/16, M 1..4096")
                      + f") compiled by Triton {version} for the chip, without a GPU; shared memory as the compiler "
                      "reports it."])
    text += "\n\n" + ("Failures:\n" + "\n".join(failures) if failures else "No failures.")
    print(text)
    if not args.no_write and not args.smoke:
        command = "python benchmarks/gpu_compile.py" + (f" --compile-with {args.compile_with}"
                                                         if args.compile_with != sys.executable else "")
        append_section(f"Triton kernels compiled for each GPU (no GPU needed), Triton {version}", command, text)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
