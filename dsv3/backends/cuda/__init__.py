"""NVIDIA backend. Triton is imported only when the backend is created."""

from .backend import CudaKernels

__all__ = ["CudaKernels"]
