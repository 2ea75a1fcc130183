"""Which FP8 mode the cuda and rocm backends pick, from faked device properties (no GPU needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dsv3.backends.cuda import CudaKernels
from dsv3.backends.rocm import RocmKernels
from dsv3.backends.rocm.backend import arch_mode
from dsv3.core.errors import BackendError

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz


@pytest.mark.parametrize("arch,fp8", [
    ("gfx942:sramecc+:xnack-", FNUZ), ("gfx941", FNUZ), ("gfx940", FNUZ), ("gfx950", FN),
    ("gfx90a:sramecc+:xnack-", None), ("gfx908", None), ("gfx1100", None),
])
def test_arch_table(arch, fp8):
    got, why = arch_mode(arch)
    assert got == fp8
    assert arch.split(":")[0] in why and ("BF16" in why) == (fp8 is None)


@pytest.fixture
def fake_rocm(monkeypatch):
    def install(arch: str):
        monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=0: SimpleNamespace(gcnArchName=arch))
        monkeypatch.delenv("DSV3_ROCM_ARCH", raising=False)
    return install


@pytest.mark.parametrize("arch,fp8,act_max", [("gfx942:sramecc+:xnack-", FNUZ, 240.0), ("gfx950", FN, 448.0),
                                              ("gfx90a", None, 448.0)])
def test_rocm_detects_mode_from_gcn_arch(fake_rocm, arch, fp8, act_max):
    fake_rocm(arch)
    ok, why = RocmKernels.available()
    assert ok and arch.split(":")[0] in why
    k = RocmKernels("cuda")  # creating the object touches no device memory
    assert (k.fp8_dtype, k.act_max) == (fp8, act_max)


def test_rocm_arch_override_and_clamp(fake_rocm, monkeypatch):
    fake_rocm("gfx90a")
    monkeypatch.setenv("DSV3_ROCM_ARCH", "gfx942")
    monkeypatch.setenv("DSV3_ROCM_FP8_ACT_MAX", "224")
    k = RocmKernels("cuda")
    assert (k.fp8_dtype, k.act_max) == (FNUZ, 224.0)
    monkeypatch.setenv("DSV3_ROCM_FP8_ACT_MAX", "300")
    with pytest.raises(BackendError, match=r"DSV3_ROCM_FP8_ACT_MAX='300'; expected a number in \(0, 240\]"):
        RocmKernels("cuda")


def test_rocm_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert RocmKernels.available() == (False, "this torch is not a ROCm build (torch.version.hip is None); "
                                              "install torch for ROCm")


@pytest.mark.parametrize("cap,fp8", [((9, 0), FN), ((8, 9), FN), ((10, 0), FN), ((8, 0), None), ((7, 5), None)])
def test_cuda_fp8_by_compute_capability(monkeypatch, cap, fp8):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.8", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=0: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=0: "Fake GPU")
    monkeypatch.delenv("DSV3_CUDA_CAPABILITY", raising=False)
    ok, why = CudaKernels.available()
    assert ok and f"sm{cap[0]}{cap[1]}" in why and ("BF16" in why) == (fp8 is None)
    assert CudaKernels("cuda").fp8_dtype == fp8


def test_cuda_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = CudaKernels.available_on(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in why
