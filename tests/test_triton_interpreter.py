"""The interpreter the Triton tests run under (triton_interpreter.py) rounds fp32 to bf16 as a GPU does, and its
faster float conversions give Triton's own bits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU here: its own rounding is the reference", allow_module_level=True)
import triton.language as tl  # noqa: E402


@triton.jit
def _to_bf16(x_ptr, y_ptr, z_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(y_ptr + i, x.to(tl.bfloat16))  # an explicit conversion
    tl.store(z_ptr + i, x)  # a store of fp32 to a bf16 pointer


def test_fp32_to_bf16_rounds_to_nearest_even():
    """Bit for bit torch's conversion (round to nearest, ties to even, as cvt.rn.bf16.f32): random values, ties
    both ways, the largest finite values (one rounds to inf), subnormals, signed zeros, infinities and NaN."""
    special = torch.tensor([1.00390625, 1.01171875, -1.00390625, 3.3895314e38, 3.4e38, -3.4e38, 1e-40, -1e-40, 0.0,
                            -0.0, float("inf"), -float("inf")])
    x = torch.cat([special, torch.randn(500, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.randint(
        -30, 30, (500,), generator=torch.Generator().manual_seed(1))])
    x = torch.cat([x, torch.zeros(512 - x.numel())])
    y, z = torch.empty(512, dtype=torch.bfloat16), torch.empty(512, dtype=torch.bfloat16)
    _to_bf16[(1,)](x, y, z, N=512)
    want = x.to(torch.bfloat16)
    for got in (y, z):
        bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
        assert bad.numel() == 0, f"{bad.numel()} of 512 differ, first {x[bad[0]].item()!r}: {got[bad[0]].item()!r} " \
                                 f"vs torch's {want[bad[0]].item()!r}"
    nan = torch.full((512,), float("nan"))
    _to_bf16[(1,)](nan, y, z, N=512)
    assert y.isnan().all() and z.isnan().all()


def test_narrow_float_conversions_by_table_equal_tritons_own():
    """triton_interpreter.py converts 8- and 16-bit floats through a table built by Triton's own function: for every
    input value of every format the kernels read (each FP8 flavour, bf16, fp16), to every wider or narrower format,
    the table gives Triton's bits, in the input's shape."""
    from triton.runtime import interpreter as ti

    original = getattr(ti._convert_float, "__wrapped__", None)  # Triton's function, which the table wraps
    assert original is not None and original.__module__ == ti.__name__, "the table is not installed"
    fp8 = (tl.float8e4nv, tl.float8e4b8, tl.float8e5, tl.float8e5b16)
    pairs = [(a, b) for a in fp8 for b in (tl.float16, tl.bfloat16, tl.float32)]
    pairs += [(tl.bfloat16, tl.float32), (tl.float16, tl.float32), (tl.bfloat16, tl.float16),
              (tl.float16, tl.float8e4nv)]
    rng = np.random.default_rng(0)
    for src, dst in pairs:
        for mode in (None, ti._ir.ROUNDING_MODE.RTNE):
            width = np.uint8 if src.primitive_bitwidth == 8 else np.uint16
            every = np.arange(1 << src.primitive_bitwidth, dtype=width)
            want = original(every, src, dst, mode)
            got = ti._convert_float(every, src, dst, mode)
            assert got.dtype == want.dtype and np.array_equal(got, want), f"{src} -> {dst} ({mode})"
            block = rng.choice(every, size=(3, 5))
            assert np.array_equal(ti._convert_float(block, src, dst, mode), original(block, src, dst, mode))
