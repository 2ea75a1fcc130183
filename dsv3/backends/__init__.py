"""Backend registry: name -> Kernels class, `auto` detection, and third-party plugins.

Built-in backends are imported only when asked for, so `import dsv3` never touches triton or
torch_npu. Third parties register `name = "package.module:Class"` in the entry-point group
`dsv3.backends`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import torch

from ..core.errors import BackendError
from ..core.kernels import Kernels

BUILTIN = {
    "cpu": "dsv3.backends.cpu:CpuKernels",
    "cuda": "dsv3.backends.cuda:CudaKernels",
    "rocm": "dsv3.backends.rocm:RocmKernels",
    "ascend": "dsv3.backends.ascend:AscendKernels",
    "reference": "dsv3.backends.reference:ReferenceKernels",  # the oracle, for debugging; never auto
}
#: `auto` tries these in order and takes the first usable one
AUTO_ORDER = ("cuda", "rocm", "ascend", "cpu")


def registry() -> dict[str, str]:
    found = dict(BUILTIN)
    try:
        for ep in entry_points(group="dsv3.backends"):
            found.setdefault(ep.name, ep.value)
    except Exception:  # a broken plugin's metadata must not break the built-ins
        pass
    return found


def names() -> list[str]:
    return list(registry())


def get_class(name: str) -> type[Kernels]:
    table = registry()
    if name not in table:
        raise BackendError(f"unknown backend {name!r}; choose one of auto, {', '.join(table)} (see `dsv3 backends`)")
    module, _, attr = table[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise BackendError(f"backend {name!r} failed to import ({type(e).__name__}: {e})") from None


def status(name: str) -> tuple[bool, str]:
    """(usable here, why) without raising."""
    try:
        cls = get_class(name)
    except BackendError as e:
        return False, str(e)
    try:
        return cls.available()
    except Exception as e:
        return False, f"availability check failed: {type(e).__name__}: {e}"


def resolve(name: str = "auto", device: str | torch.device | None = None) -> Kernels:
    """A ready backend. `device` overrides the backend's device (e.g. the cuda kernels on CPU
    tensors under TRITON_INTERPRET=1); then only the backend's software needs to be present."""
    if device is not None and not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise BackendError(f"device {device!r} is not a torch device; use e.g. cpu, cuda, cuda:1 or npu:0") from None
    if name == "auto":
        for candidate in AUTO_ORDER:
            ok, _ = status(candidate)
            if ok:
                return get_class(candidate)(device)
        raise BackendError("no backend is usable here (not even cpu); run `dsv3 backends` to see why")
    cls = get_class(name)
    if device is not None and hasattr(cls, "available_on"):
        ok, why = cls.available_on(torch.device(device))
    else:
        ok, why = cls.available()
    if not ok:
        raise BackendError(f"backend {name!r} is not usable here: {why}; try --backend cpu or see `dsv3 backends`")
    return cls(device)
