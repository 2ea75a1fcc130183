"""The cpu backend: the plain-torch reference for every op (see ops.py)."""

from .ops import CpuKernels

__all__ = ["CpuKernels"]
