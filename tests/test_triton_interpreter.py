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


_NESTED_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def _helper(x):
    return tl.sum(x * 3, axis=0) + tl.max(x, axis=0)


@triton.jit
def _nested(x_ptr, y_ptr, big, N: tl.constexpr):
    i = tl.arange(0, N)
    acc = tl.zeros((N,), dtype=tl.int32)
    acc += tl.load(x_ptr + i) * big  # int32 overflow: wraps, as on a GPU
    tl.store(y_ptr + i, acc + _helper(acc) + tl.cdiv(N, 3))
'''


def _run_nested(module) -> torch.Tensor:
    x = torch.arange(-8, 8, dtype=torch.int32)
    y = torch.empty(16, dtype=torch.int32)
    for _ in range(2):  # a second launch finds what the first left patched
        module._nested[(2,)](x, y, 2**30 + 7, N=16)
    return y


def test_skipped_patches_and_checks_change_no_result(tmp_path, monkeypatch):
    """triton_interpreter.py leaves out the interpreter's repeated patching of triton.language inside a launch and
    its overflow checks nobody reads (debug off): a kernel with nested helpers (its own and Triton's) and int32
    arithmetic that overflows gives Triton's own interpreter's bits, and the launch leaves triton.language and its
    tensor class as it found them."""
    import importlib
    import json
    import subprocess
    import sys

    from triton.runtime import interpreter as ti

    assert not ti.interpreter_builder.options.debug and not ti.interpreter_builder.options.sanitize_overflow
    (tmp_path / "nested_kernel.py").write_text(_NESTED_KERNEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("nested_kernel")
    _run_nested(module)  # Triton's own first launch leaves tl.tensor.__repr__ and __annotations__ in the class dict
    before = (dict(vars(tl)), dict(vars(tl.tensor)))
    got = _run_nested(module)
    assert (dict(vars(tl)), dict(vars(tl.tensor))) == before, "a launch left triton.language patched"
    plain = subprocess.run([sys.executable, "-c", "import sys, torch; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
                            "import nested_kernel, test_triton_interpreter as t; "
                            "print(t._run_nested(nested_kernel).tolist())", str(tmp_path), os.path.dirname(__file__)],
                           env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, check=False)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert got.tolist() == json.loads(plain.stdout.strip().splitlines()[-1]), (got.tolist(), plain.stdout)
