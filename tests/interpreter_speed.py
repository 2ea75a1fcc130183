"""A faster Triton interpreter for the tests: the same semantics, less of its bookkeeping.

The suite runs the cuda and rocm kernels on CPU tensors under TRITON_INTERPRET=1, most of its time on 2 cores. `python tests/interpreter_speed.py SCRIPT ARGS...` runs a script (a benchmark's --smoke) with
it installed, as the tests that start one do.
"""

from __future__ import annotations

import os
import runpy
import sys


def install() -> None:
    """Triton's interpreter patches triton.language at every kernel launch and at every call of a @triton.jit helper
    inside one, each time walking four modules with inspect.getmembers (~3 ms) to find the same builtins. Profiled
    on a triton model test, that walk was a quarter of its time. Remember which names are builtins per module and
    patch those, as the interpreter would (a name whose member is already patched is skipped, as there); a Triton
    without these internals just runs slower."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter as ti
    except Exception:  # no triton, or one that fails to import here: its tests skip
        return
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
