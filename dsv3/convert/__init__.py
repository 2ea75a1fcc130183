"""Offline checkpoint tools that run on any machine: dequant, reshard, fnuz, verify."""

from .dequant import dequant
from .fnuz import fnuz
from .reshard import reshard
from .verify import verify

__all__ = ["dequant", "reshard", "fnuz", "verify"]
