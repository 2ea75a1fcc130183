"""The GPU benchmark script runs end to end (tiny shapes, Triton interpreter), so the one prepared
script a GPU session gets is known to work before it meets a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = [sys.executable, str(ROOT / "tests" / "triton_interpreter.py")]  # a script under the tests' interpreter


def test_gpu_kernels_benchmark_smoke(tmp_path):
    """Every table under the interpreter, and --tune's config file loads as the kernels' launch table."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = tmp_path / "tuned.json"
    r = subprocess.run([*INTERPRETED, "benchmarks/gpu_kernels.py", "--smoke", "--tune", "--tune-out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for heading in ("### FP8 GEMM", "### Fused MoE", "### MLA decode", "### GEMM launch configs"):
        assert heading in r.stdout
    assert "nan" not in r.stdout.lower()
    from dsv3.backends.cuda.launch import parse_table

    table = parse_table(json.loads(out.read_text()), str(out))
    assert {"default", "24576x1536", "7168x2048"} <= set(table.gemm) and table.arch == "sm90"  # measured entries kept


@pytest.mark.slow
def test_gpu_e2e_benchmark_smoke(tmp_path):
    """benchmarks/gpu_e2e.py end to end on the tiny model under the interpreter: every row, no NaN."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([*INTERPRETED, "benchmarks/gpu_e2e.py", "--smoke", "--workdir", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("dsv3 cuda FP8, graphs", "dsv3 cuda BF16 mode", "transformers bf16, default cache", "/layer",
                "MTP perfect drafts (k = 1", "MTP perfect drafts (k = 2"):
        assert row in r.stdout, r.stdout
    assert "| nan" not in r.stdout.replace("| nan |", "")  # peak memory is nan without a GPU; nothing else


@pytest.mark.slow
def test_gpu_compile_every_launch_for_an_h100_without_one(tmp_path):
    """benchmarks/gpu_compile.py --smoke: every kernel launch of the demo model on the cuda backend, compiled by
    Triton's own compiler for sm90 (ptxas from the triton wheel, no GPU), fits the chip's shared memory. Then the
    check must be able to fail: a tile too big for the chip and a kernel the compiler rejects are both reported."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "benchmarks/gpu_compile.py", "--smoke", "--chips", "sm90", "--no-write",
                        "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "No failures." in r.stdout and "| sm90 (H100/H200) |" in r.stdout, r.stdout
    assert "TRITON_DEFAULT_FP_FUSION" not in r.stderr, "a launch left FP fusion to Triton's default"
    for kernel in ("_fp8_gemm_kernel", "_moe_gemm_kernel", "_mla_decode_kernel", "_latent_kernel",
                   "_gate_select_kernel"):
        assert kernel in r.stdout, kernel
    launches = json.loads((tmp_path / "sm90-launches.json").read_text())
    mla = next(e for e in launches if e["kernel"] == "_mla_decode_kernel")
    norm = next(e for e in launches if e["kernel"] == "_rms_norm_kernel")
    rowwise = [e for e in launches if "ROWS" in e["args"]]  # compiled as a GPU runs them: a token per program
    assert {e["kernel"] for e in rowwise} >= {"_rms_norm_kernel", "_gate_select_kernel", "_combine_kernel"}, rowwise
    assert all(e["args"]["ROWS"] == 1 for e in rowwise), [(e["kernel"], e["args"]["ROWS"]) for e in rowwise]
    too_big = json.loads(json.dumps(mla))
    for name in ("ql_ptr", "qp_ptr", "kv_ptr", "pe_ptr"):
        too_big["args"][name]["tensor"] = "float32"
    too_big["args"].update(BLOCK_T=128, BLOCK_C=512, BLOCK_R=64)  # 128 keys x 576 x 4 bytes, twice: > 227 KB
    rejected = {**norm, "args": {**norm["args"], "BLOCK_D": 100}}  # tl.arange needs a power of two
    (tmp_path / "crafted.json").write_text(json.dumps([norm, too_big, rejected]))
    r = subprocess.run([sys.executable, "benchmarks/gpu_compile.py", "--compile", "sm90",
                        str(tmp_path / "crafted.json"), str(tmp_path / "crafted-out.json")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    ok, big, bad = json.loads((tmp_path / "crafted-out.json").read_text())
    assert ok["ok"] and not big["ok"] and not bad["ok"], (ok, big, bad)
    assert "bytes of shared memory; sm90 has 232448" in big["error"], big
    assert "power of 2" in bad["error"] or "CompilationError" in bad["error"], bad


@pytest.mark.parametrize("mode", ["fp8", "bf16"], ids=["FP8", "BF16-sm80"])
@pytest.mark.parametrize("name", ["demo", "v3ish", "noqlora", "blocks"])
def test_decode_step_launch_budget(name, mode, tmp_path, monkeypatch):
    """Kernels one cuda decode step launches (Triton + aten, dtype conversions included), per layer, batch 1 and
    4, counted under the interpreter: at most 24 (issue 12; it was ~100), in the FP8 mode and in the BF16 mode of a
    GPU without FP8 (sm80: 16-bit weights, whose decode linears take the same fused epilogues). The 280M model's
    figures are in RESULTS.md (`TRITON_INTERPRET=1 python benchmarks/gpu_e2e.py --launches`): too slow to build
    here."""
    pytest.importorskip("triton")
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    from gpu_e2e import decode_launches
    from tiny_configs import CONFIGS

    import dsv3
    from dsv3.synthetic import DEMO, write_checkpoint

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    cfg = {"demo": DEMO, **CONFIGS}[name]
    path = write_checkpoint(tmp_path / name, cfg, seed=0)
    if mode == "bf16":
        monkeypatch.setenv("DSV3_CUDA_CAPABILITY", "8.0")
    engine = dsv3.load(path, backend="cuda", device="cuda" if torch.cuda.is_available() else "cpu", dtype="bf16")
    per_layer = {b: decode_launches(engine, b) / len(engine.model.layers) for b in (1, 4)}
    assert (engine.kernels.fp8_dtype is None) == (mode == "bf16"), engine.kernels.mode  # the mode asked for
    print(f"{name} {mode}: kernels per layer in one decode step: {per_layer} (budget: 24)")
    assert per_layer[1] == per_layer[4]  # launches do not grow with the batch
    assert per_layer[1] <= 24, per_layer


def test_serve_load_benchmark_smoke(tmp_path):
    """benchmarks/serve_load.py end to end on the demo model: engine.generate, a real server, 1/4/16 clients."""
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    r = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--smoke", "--workdir", str(tmp_path)], cwd=ROOT,
                       capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("| engine.generate |", "| 16 |", "Chunked prefill", "| 16, `--speculative mtp` |", "tokens drafted",
                "answers of one prompt"):
        assert row in r.stdout, r.stdout


def test_speculative_benchmark_smoke(tmp_path):
    """benchmarks/speculative.py end to end on the demo model: plain, MTP drafts, perfect drafts, the byte bound."""
    r = subprocess.run([sys.executable, "benchmarks/speculative.py", "--smoke", "--workdir", str(tmp_path)], cwd=ROOT,
                       capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| DEMO |" in r.stdout and "2.00 tokens/step" in r.stdout and "perfect drafts, k = 2" in r.stdout, r.stdout


def test_grammar_masks_benchmark_smoke():
    """benchmarks/grammar_masks.py on a 4096-token vocabulary: a row per grammar, each mask checked against the
    plain scan inside the script."""
    r = subprocess.run([sys.executable, "benchmarks/grammar_masks.py", "--smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(row in r.stdout for row in ("| json_object |", "| json_schema", "| tools, one strict |")), r.stdout


@pytest.mark.parametrize("script,rows", [
    # the C attention kernel and plain torch side by side, a figure for each
    ("cpu_attention.py", ["| 2 x 1 | 1500 |", "| 1 x 2 | 300 |", "x** |"]),
    # FP8 and bf16 linear rates and the read rate, K not a multiple of 64 or 128
    ("cpu_linear.py", ["| tail (129 x 1029) | 2 |", "FP8"]),
])
def test_cpu_kernel_benchmark_smoke(script, rows):
    """The cpu kernel benchmarks on small shapes: every row printed, no NaN."""
    from dsv3.backends.cpu import native

    if native.load() is None:
        pytest.skip("no C kernels here")
    r = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(row in r.stdout for row in rows) and "nan" not in r.stdout.lower(), r.stdout


def test_cpu_batch_decode_benchmark_smoke():
    """benchmarks/cpu_batch_decode.py on the demo model: tiles against the C kernel per batch where the CPU has AMX,
    else one line saying there is nothing to compare."""
    from dsv3.backends.cpu import native

    lib = native.load()
    r = subprocess.run([sys.executable, "benchmarks/cpu_batch_decode.py", "--smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    want = ["| DEMO | 1 |", "| DEMO | 8 |", "x** |"] if lib is not None and lib.amx else ["without AMX tiles"]
    assert all(row in r.stdout for row in want) and "nan" not in r.stdout.lower(), r.stdout


def test_gpu_session_script_is_ready():
    """The one script a GPU session runs: valid bash, and every benchmark it calls exists and takes its flags."""
    import re

    script = ROOT / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    calls = re.findall(r"python3 (benchmarks/\S+\.py)([^\n]*)", script.read_text())
    assert {c for c, _ in calls} >= {"benchmarks/gpu_kernels.py", "benchmarks/gpu_e2e.py"}
    for path in {c for c, _ in calls}:
        usage = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120, check=True).stdout
        for flags in (f for c, f in calls if c == path):
            for flag in re.findall(r"--[a-z-]+", flags):
                assert flag in usage, f"{path} has no {flag}"


def test_a_benchmark_without_workdir_leaves_nothing_in_tmp(tmp_path):
    """bench_checkpoint without --workdir writes to a temporary directory that is gone once the process ends (the
    280M checkpoint and its conversions are 1.2 GB); with --workdir it stays for the next run. The checkpoint
    writer is stubbed: what is tested is where it writes and what is left."""
    code = (
        "import sys, tempfile; sys.path.insert(0, 'benchmarks'); import results as R\n"
        "R.synthetic_checkpoint = lambda path, cfg, n_shards: (path.mkdir(parents=True), path)[1]\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        f"work, ckpt = R.bench_checkpoint(None, 'dsv3-bench-')\n"
        "assert ckpt.is_dir() and work.parent == R.Path(tempfile.tempdir), work\n"
        f"kept, _ = R.bench_checkpoint(R.Path({str(tmp_path / 'kept')!r}), 'dsv3-bench-')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
