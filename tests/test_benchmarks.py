"""The GPU benchmark script runs end to end (tiny shapes, Triton interpreter), so the one prepared
script a GPU session gets is known to work before it meets a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_kernels_benchmark_smoke():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "benchmarks/gpu_kernels.py", "--smoke", "--tune"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for heading in ("### FP8 GEMM", "### Fused MoE", "### MLA decode", "### GEMM launch configs"):
        assert heading in r.stdout
    assert "nan" not in r.stdout.lower()
