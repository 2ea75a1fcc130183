"""AMD backend."""

from .backend import RocmKernels

__all__ = ["RocmKernels"]
