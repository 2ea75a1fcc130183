"""The interpreter the Triton tests run under (triton_interpreter.py) rounds fp32 to bf16 as a GPU does."""

from __future__ import annotations

import os

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
