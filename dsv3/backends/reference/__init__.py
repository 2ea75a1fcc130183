"""The plain-torch reference backend: the numerical oracle every backend is tested against."""

from .ops import ReferenceKernels

__all__ = ["ReferenceKernels"]
