"""AMD GPUs: the Triton kernels of backends/cuda, run with AMD launch tables and the chip's FP8 flavour.

gfx940/941/942 (MI300, MI325) compute FP8 as e4m3fnuz: the released e4m3fn weights are converted
at load (bytes kept, -0 cleared, scale doubled) and activations quantize to ±240 (or a clamp such
as 224). gfx950 (MI350) uses OCP e4m3fn like NVIDIA. Everything else (gfx90a MI250, gfx908 ...) has
no FP8 and runs BF16 with weights dequantized at load. ROCm builds of torch name the device `cuda`.
"""

from __future__ import annotations

import os

import torch

from ...core.errors import BackendError
from ...core.fp8 import FP8_MAX
from ..cuda.backend import CudaKernels, _no_triton

#: gcnArchName prefix -> FP8 dtype the chip computes in (absent: no FP8, BF16)
ARCH_FP8 = {
    "gfx940": torch.float8_e4m3fnuz,
    "gfx941": torch.float8_e4m3fnuz,
    "gfx942": torch.float8_e4m3fnuz,
    "gfx950": torch.float8_e4m3fn,
}
FNUZ_MAX = FP8_MAX[torch.float8_e4m3fnuz]


def arch_mode(arch: str) -> tuple[torch.dtype | None, str]:
    """(FP8 dtype or None, one line for `dsv3 backends`) for a gcnArchName such as 'gfx942:sramecc+:xnack-'."""
    base = arch.split(":")[0].strip().lower()
    fp8 = ARCH_FP8.get(base)
    if fp8 == torch.float8_e4m3fnuz:
        return fp8, f"{base}: FP8 e4m3fnuz (weights converted from e4m3fn at load, scales doubled)"
    if fp8 == torch.float8_e4m3fn:
        return fp8, f"{base}: FP8 e4m3fn (OCP), as released"
    return None, f"{base} has no FP8; running BF16 with weights dequantized at load"


def _device_arch(device: torch.device | int = 0) -> str:
    return getattr(torch.cuda.get_device_properties(device), "gcnArchName", "unknown")


class RocmKernels(CudaKernels):
    name = "rocm"
    device_type = "cuda"
    dist_backend = "nccl"  # RCCL answers to the nccl name on ROCm builds
    target = "amd"

    def select_mode(self) -> tuple[torch.dtype | None, str]:
        """DSV3_ROCM_ARCH (e.g. gfx942, gfx950, gfx90a) overrides detection: tests, or a mislabelled device."""
        arch = os.environ.get("DSV3_ROCM_ARCH")
        if not arch:
            arch = _device_arch(self.device) if self.device.type == "cuda" else "gfx942"
        return arch_mode(arch)

    def activation_max(self) -> float:
        """±240 for fnuz; DSV3_ROCM_FP8_ACT_MAX=224 clamps tighter, as one engine does for accuracy."""
        if self.fp8_dtype != torch.float8_e4m3fnuz:
            return FP8_MAX[torch.float8_e4m3fn]
        raw = os.environ.get("DSV3_ROCM_FP8_ACT_MAX", str(FNUZ_MAX))
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value <= FNUZ_MAX:
            raise BackendError(f"DSV3_ROCM_FP8_ACT_MAX={raw!r}; expected a number in (0, 240], e.g. 224")
        return value

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if not getattr(torch.version, "hip", None):
            return False, "this torch is not a ROCm build (torch.version.hip is None); install torch for ROCm"
        if not torch.cuda.is_available():
            return False, "no AMD GPU visible (check HIP_VISIBLE_DEVICES and the amdgpu driver)"
        if why := _no_triton():
            return False, why.replace("dsv3[cuda]", "dsv3[rocm]")
        return True, arch_mode(os.environ.get("DSV3_ROCM_ARCH") or _device_arch(0))[1]
