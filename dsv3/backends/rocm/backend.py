"""AMD GPUs (ROCm builds of torch use the `cuda` device name): reference ops in BF16 for now.

FP8 (e4m3fnuz on gfx94x) and the Triton kernels are issue 6; weights are dequantized at load,
which is correct on every AMD generation (no fn/fnuz confusion is possible in BF16).
"""

from __future__ import annotations

import torch

from ..cpu import CpuKernels


class RocmKernels(CpuKernels):
    name = "rocm"
    device_type = "cuda"
    fp8_dtype = None
    dist_backend = "nccl"  # RCCL answers to the nccl name on ROCm builds

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not getattr(torch.version, "hip", None):
            return False, "this torch is not a ROCm build (torch.version.hip is None); install torch for ROCm"
        if not torch.cuda.is_available():
            return False, "no AMD GPU visible (check HIP_VISIBLE_DEVICES and the amdgpu driver)"
        arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "unknown")
        return True, f"{arch}: BF16 via torch ops (FP8/Triton kernels not built yet)"
