"""The FP8 flavours the Triton kernels run in, and where a test can run them.

NVIDIA and AMD share the kernel source; a target fixes the FP8 dtype, the activation clamp and
the launch table. Without the matching GPU the kernels run on CPU tensors under Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz


@dataclass(frozen=True)
class Target:
    id: str
    backend: str
    vendor: str  # launch table: "nvidia" | "amd"
    fp8: torch.dtype | None  # None: the BF16 mode of a chip without FP8
    act_max: float = 448.0
    env: dict = field(default_factory=dict)


FP8_TARGETS = [
    Target("cuda-sm90-e4m3fn", "cuda", "nvidia", FN),
    Target("rocm-gfx942-e4m3fnuz", "rocm", "amd", FNUZ, 240.0, {"DSV3_ROCM_ARCH": "gfx942"}),
    Target("rocm-gfx942-e4m3fnuz-clamp224", "rocm", "amd", FNUZ, 224.0,
           {"DSV3_ROCM_ARCH": "gfx942", "DSV3_ROCM_FP8_ACT_MAX": "224"}),
    Target("rocm-gfx950-e4m3fn", "rocm", "amd", FN, 448.0, {"DSV3_ROCM_ARCH": "gfx950"}),
]
BF16_TARGETS = [
    Target("cuda-sm80-bf16", "cuda", "nvidia", None, env={"DSV3_CUDA_CAPABILITY": "8.0"}),
    Target("rocm-gfx90a-bf16", "rocm", "amd", None, env={"DSV3_ROCM_ARCH": "gfx90a"}),
]


def device_for(vendor: str) -> str:
    """'cuda' on the vendor's GPU, 'cpu' under the interpreter; skips (never fails) otherwise."""
    hip = bool(getattr(torch.version, "hip", None))
    if torch.cuda.is_available() and hip == (vendor == "amd"):
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.importorskip("triton", reason="triton is not installed")
        return "cpu"
    pytest.skip(f"no {vendor} GPU here and TRITON_INTERPRET is not 1 (the other vendor's GPU cannot run these)")


def ids(targets: list[Target]) -> list[str]:
    return [t.id for t in targets]
