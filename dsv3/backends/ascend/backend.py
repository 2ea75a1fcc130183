"""Ascend NPUs (910B/910C): BF16 only, FP8 weights dequantized on the host at load.

Ops are the reference implementation on the `npu` device for now; the fused torch_npu ops
(npu_rms_norm, npu_fused_infer_attention_score, npu_moe_gating_top_k, grouped matmul) are issue 7.
"""

from __future__ import annotations

import importlib.util

from ..cpu import CpuKernels


class AscendKernels(CpuKernels):
    name = "ascend"
    device_type = "npu"
    fp8_dtype = None
    dist_backend = "hccl"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("torch_npu") is None:
            return False, "torch_npu is not installed (pip install 'dsv3[ascend]' on a machine with the CANN toolkit)"
        try:
            import torch
            import torch_npu  # noqa: F401
        except Exception as e:
            return False, f"torch_npu failed to import ({type(e).__name__}: {e}); source CANN's set_env.sh first"
        if not torch.npu.is_available():
            return False, "torch_npu imports but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES and npu-smi)"
        return True, f"{torch.npu.device_count()} NPU(s): BF16 via torch ops (fused torch_npu ops not built yet)"
