"""Huawei Ascend backend. torch_npu is imported only when the backend is checked or created."""

from .backend import AscendKernels

__all__ = ["AscendKernels"]
