"""Triton's interpreter as the tests use it: a GPU's bf16 rounding, and less of its bookkeeping.

The suite runs the cuda and rocm kernels on CPU tensors under TRITON_INTERPRET=1 (most of its time on 2 cores).
`python tests/triton_interpreter.py SCRIPT ARGS...` runs a script (a benchmark's --smoke) with all of it installed,
as the tests that start one do.
"""

from __future__ import annotations

import os
import runpy
import sys

import numpy as np


def install() -> None:
    """The changes below, where the interpreter runs and Triton has the internals they replace."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except Exception:  # no triton, or one that fails to import here: its tests skip
        return
    _round_bf16_to_nearest_even(ti, tl)
    _list_builtins_once(ti, tl)
    _remember_types(ti, tl)
    _share_tensor_shapes(tl)
    _convert_narrow_floats_by_table(ti)
    _no_overflow_checks_nobody_reads(ti)
    _patch_the_language_once_per_launch(ti, tl)


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


def _remember_types(ti, tl) -> None:
    """Every op the interpreter runs builds its result's block type (checking and formatting the shape) and looks up
    the numpy dtype of a Triton dtype in a dict it rebuilds per call: together a fifth of a triton model test's
    profile. Both are pure functions of (dtype, shape), so the results are kept per key; a first sight (and any
    error) still goes through Triton's own code. A Triton without these internals keeps its own."""
    get_np_dtype, block_type = getattr(ti, "_get_np_dtype", None), getattr(tl, "block_type", None)
    if get_np_dtype is None or block_type is None or not hasattr(tl, "pointer_type"):
        return
    np_dtypes: dict[str, np.dtype] = {}
    pointer = np.dtype(np.uint64)

    def np_dtype(tt):
        scalar = tt.element_ty if isinstance(tt, block_type) else tt
        if isinstance(scalar, tl.pointer_type):
            return pointer
        found = np_dtypes.get(scalar.name)
        if found is None:
            found = np_dtypes[scalar.name] = get_np_dtype(tt)
        return found

    ti._get_np_dtype = np_dtype  # the interpreter's callers look the name up in its module at each call
    init, blocks = block_type.__init__, {}

    def block_init(self, element_ty, shape):
        try:
            key = (element_ty.name, tuple(d.value if isinstance(d, tl.constexpr) else d for d in shape))
            known = blocks.get(key)
        except TypeError:  # not a sequence, or an unhashable dimension: Triton's own code says what is wrong
            key = known = None
        if known is None:
            init(self, element_ty, shape)
            if key is not None:
                blocks[key] = (self.shape, self.numel, self.name)
            return
        self.element_ty = element_ty
        self.shape, self.numel, self.name = known

    block_type.__init__ = block_init


def _share_tensor_shapes(tl) -> None:
    """Each tensor an op makes gets its block's shape as Triton keeps it (a tuple of constexpr dims and their
    product), built anew every time (~10% of a GEMM's interpreted time). Nothing changes them once made, so they
    are built once per shape and shared; tensors that are not blocks keep Triton's own code."""
    tensor, block_type = getattr(tl, "tensor", None), getattr(tl, "block_type", None)
    if tensor is None or block_type is None:
        return
    tensor_init, shapes = tensor.__init__, {}

    def init_tensor(self, handle, type):
        known = shapes.get(type.shape) if isinstance(type, block_type) else None
        if known is None:
            tensor_init(self, handle, type)
            if isinstance(type, block_type):
                shapes[type.shape] = (self.shape, self.numel)
            return
        self.handle, self.type, self.dtype = handle, type, type.scalar
        self.shape, self.numel = known

    tensor.__init__ = init_tensor


def _convert_narrow_floats_by_table(ti) -> None:
    """The interpreter converts between float formats bit by bit in numpy (~20 array ops a call): every FP8 weight
    tile a tl.dot reads, every bf16 load widened to fp32. Each output element depends on its input element only, so
    for 8- and 16-bit inputs the conversion is a table over all 2^bits inputs, built once per (formats, rounding)
    by Triton's own function: the same bits, one lookup. Wider inputs (fp32 -> bf16 rounds) keep Triton's code."""
    convert = getattr(ti, "_convert_float", None)
    if convert is None:
        return
    tables: dict[tuple, np.ndarray] = {}

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        bits, data = input_dtype.primitive_bitwidth, np.ascontiguousarray(input)
        if bits not in (8, 16) or data.itemsize * 8 != bits:
            return convert(input, input_dtype, output_dtype, rounding_mode)
        width = np.uint8 if bits == 8 else np.uint16
        key = (input_dtype.name, output_dtype.name, rounding_mode)
        table = tables.get(key)
        if table is None:
            table = tables[key] = convert(np.arange(1 << bits, dtype=width), input_dtype, output_dtype, rounding_mode)
        return table[data.view(width)]

    convert_float.__wrapped__ = convert
    ti._convert_float = convert_float


def _no_overflow_checks_nobody_reads(ti) -> None:
    """Every integer +, - and * (index and pointer arithmetic: most of a kernel's ops) is checked for int32 overflow:
    both operands widened to int64, the op done again, two compares, an and, then a device_assert that does
    nothing unless the interpreter runs in debug mode (a quarter of a GEMM's interpreted time). A GPU compile
    drops the same dead check. Off where debug is off; TRITON_DEBUG's runs keep it."""
    import dataclasses

    builder = getattr(ti, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or not dataclasses.is_dataclass(options) or getattr(options, "debug", True):
        return
    if getattr(options, "sanitize_overflow", False):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


def _patch_the_language_once_per_launch(ti, tl) -> None:
    """A launch patches triton.language's builtins for the interpreter and restores them when its grid is done;
    each call of a @triton.jit helper inside it (ours, and Triton's own: tl.zeros, tl.cdiv, tl.sum ...) patches the
    same modules again (~1 ms a call, every program; what it returns is thrown away, so the patch is never undone
    either). Inside a launch, a helper's call patches only modules no earlier patch of that launch covered; what
    is patched, and what stays patched after the launch, is as in Triton's own code."""
    import threading

    patch_lang, executor = getattr(ti, "_patch_lang", None), getattr(ti, "GridExecutor", None)
    if patch_lang is None or executor is None:
        return
    local = threading.local()  # per thread (a server's model thread): its open launches

    def open_launches() -> list[frozenset[int] | None]:  # each one's modules its patch covered (None: not yet)
        if not hasattr(local, "launches"):
            local.launches = []
        return local.launches

    def langs(fn) -> frozenset[int]:  # the modules Triton's _patch_lang patches for fn
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    class NothingToRestore:
        def restore(self) -> None:
            pass

    def patch_lang_once(fn):
        launches = open_launches()
        if not launches:
            return patch_lang(fn)
        if launches[-1] is not None and langs(fn) <= launches[-1]:
            return NothingToRestore()
        scope = patch_lang(fn)  # the launch's own patch, or a helper's (Triton's own: tl.core) it did not cover
        launches[-1] = langs(fn) | (launches[-1] or frozenset())
        return scope

    call = executor.__call__

    def launch(self, *args, **kwargs):
        launches = open_launches()
        launches.append(None)
        try:
            return call(self, *args, **kwargs)
        finally:
            launches.pop()

    ti._patch_lang = patch_lang_once
    executor.__call__ = launch


if __name__ == "__main__":
    install()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")
