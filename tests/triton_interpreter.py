"""Triton's interpreter as the tests use it: a GPU's bf16 rounding, and less of its bookkeeping.

The suite runs the cuda and rocm kernels on CPU tensors under TRITON_INTERPRET=1 (most of its time on 2 cores).
`python tests/triton_interpreter.py SCRIPT ARGS...` runs a script (a benchmark's --smoke) with both installed, as
the tests that start one do.
"""

from __future__ import annotations

import os
import runpy
import sys

import numpy as np


def install() -> None:
    """Both changes below, where the interpreter runs and Triton has the internals they replace."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except Exception:  # no triton, or one that fails to import here: its tests skip
        return
    _round_bf16_to_nearest_even(ti, tl)
    _list_builtins_once(ti, tl)


def _round_bf16_to_nearest_even(ti, tl) -> None:
    """A kernel's fp32 -> bf16 conversion (`.to(tl.bfloat16)`, or a store of fp32 to a bf16 pointer) rounds to
    nearest even on a GPU (Triton's default, cvt.rn.bf16.f32), but Triton 3.9's interpreter drops the low 16 bits:
    round toward zero, twice the mean error and biased toward zero. Found when the bf16-mode model's typical error
    came out 1.57x transformers' (0.0209 vs 0.0133) and RMSNorm, whose output every layer rounds, explained most of
    it. Round here as the GPU does (NaN kept a quiet NaN); other conversions are left to the interpreter."""
    builder = getattr(ti, "InterpreterBuilder", None)
    cast, handle = getattr(builder, "cast_impl", None), getattr(ti, "TensorHandle", None)
    if cast is None or handle is None:
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
        nearest = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), nearest).astype(np.uint16)
        return handle(out, dst_type.scalar)

    builder.cast_impl = cast_impl


def _list_builtins_once(ti, tl) -> None:
    """Triton's interpreter patches triton.language at every kernel launch and at every call of a @triton.jit helper
    inside one, each time walking four modules with inspect.getmembers (~3 ms) to find the same builtins. Profiled
    on a triton model test, that walk was a quarter of its time. Remember which names are builtins per module and
    patch those, as the interpreter would (a name whose member is already patched is skipped, as there); a Triton
    without these internals just runs slower."""
    import inspect

    patch_attr, is_builtin = getattr(ti, "_patch_attr", None), getattr(tl.core, "is_builtin", None)
    if patch_attr is None or is_builtin is None or not hasattr(ti, "_patch_builtin"):
        return
    builtins: dict[int, tuple[object, list[str]]] = {}

    def patch_builtin(pkg, builder, scope) -> None:
        if id(pkg) not in builtins:  # the module itself is kept, so its id is not reused
            builtins[id(pkg)] = (pkg, [name for name, member in inspect.getmembers(pkg) if is_builtin(member)])
        for name in builtins[id(pkg)][1]:
            member = getattr(pkg, name)
            if is_builtin(member):
                patch_attr(pkg, name, member, builder, scope)

    ti._patch_builtin = patch_builtin


if __name__ == "__main__":
    install()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
