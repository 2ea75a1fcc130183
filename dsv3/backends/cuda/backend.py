"""NVIDIA GPUs: the reference ops on the cuda device, in BF16 (FP8 weights dequantized at load).

The Triton FP8 kernels (issue 5) override ops here as they land; until then every op is the
cpu reference running on the GPU through torch.
"""

from __future__ import annotations

import torch

from ..cpu import CpuKernels


class CudaKernels(CpuKernels):
    name = "cuda"
    device_type = "cuda"
    fp8_dtype = None
    dist_backend = "nccl"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if getattr(torch.version, "hip", None):
            return False, "this torch is a ROCm build; use --backend rocm"
        if not torch.version.cuda:
            return False, "this torch is a CPU-only build (no CUDA); install a CUDA build of torch"
        if not torch.cuda.is_available():
            return False, "no NVIDIA GPU visible (torch.cuda.is_available() is False; check CUDA_VISIBLE_DEVICES and the driver)"
        name = torch.cuda.get_device_name(0)
        return True, f"{name}: BF16 via torch ops (Triton FP8 kernels not built yet)"
