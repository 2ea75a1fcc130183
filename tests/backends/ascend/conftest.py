"""Where the ascend tests get torch_npu: the real one on a machine with a visible NPU, otherwise the
emulation in emulated_npu/ (put on sys.path under the name torch_npu for the test, then removed)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EMULATION = Path(__file__).parent / "emulated_npu"


def _real_npu() -> bool:
    try:
        import torch

        importlib.import_module("torch_npu")
        return bool(torch.npu.is_available())
    except Exception:
        return False


REAL = _real_npu()
#: the test ids say which ops ran: "emulated" (plain-torch emulation on CPU) or "npu" (the real ops)
MODE = "npu" if REAL else "emulated"


class NpuEnv:
    def __init__(self, device: str, module):
        self.device, self.torch_npu = device, module


def _enter(mp: pytest.MonkeyPatch) -> NpuEnv:
    if REAL:
        return NpuEnv("npu", importlib.import_module("torch_npu"))
    mp.syspath_prepend(str(EMULATION))
    mp.delitem(sys.modules, "torch_npu", raising=False)
    module = importlib.import_module("torch_npu")
    mp.setitem(sys.modules, "torch_npu", module)  # removed again when the test's patch context closes
    assert getattr(module, "EMULATED", False), f"expected the emulation, imported {module.__file__}"
    return NpuEnv("cpu", module)


@pytest.fixture(params=[MODE])
def npu(request, monkeypatch):
    """torch_npu for one test (param id: emulated | npu)."""
    if not REAL:
        request.applymarker(pytest.mark.emulated)
    return _enter(monkeypatch)


@pytest.fixture(scope="module", params=[MODE])
def npu_module(request):
    """The same for a whole test module (engines loaded once)."""
    with pytest.MonkeyPatch.context() as mp:
        yield _enter(mp)
