"""A guard that fails on any host synchronization made from dsv3's own code (issue 12).

Patches the ways Python code waits for a device value: Tensor.item/tolist/__bool__/__int__/__float__/
cpu/numpy/nonzero and torch.nonzero/bincount/unique/masked_select; and torch.tensor/as_tensor, which copy
host data to the device (a synchronous copy from pageable memory: inside a CUDA graph capture it fails the
capture, and with it every graph of the backend). Only calls whose caller is a dsv3 source file count:
Triton's interpreter and torch internals may copy as they please.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

PKG = str(Path(__file__).parents[1] / "dsv3")
METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero")
FUNCTIONS = ("nonzero", "bincount", "unique", "masked_select", "tensor", "as_tensor")


class HostSync(AssertionError):
    pass


@contextmanager
def no_host_sync():
    saved_m = {n: getattr(torch.Tensor, n) for n in METHODS}
    saved_f = {n: getattr(torch, n) for n in FUNCTIONS}

    def guarded(name, original):
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PKG):
                raise HostSync(f"host synchronization: {name} called from {caller}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)
        return call

    try:
        for n, f in saved_m.items():
            setattr(torch.Tensor, n, guarded(f"Tensor.{n}", f))
        for n, f in saved_f.items():
            setattr(torch, n, guarded(f"torch.{n}", f))
        yield
    finally:
        for n, f in saved_m.items():
            setattr(torch.Tensor, n, f)
        for n, f in saved_f.items():
            setattr(torch, n, f)
