"""Decode-step capture on the CPU: the cpu backend's counterpart of a CUDA graph.

A decode step of the 280M model makes ~130 C calls and ~100 small torch ops, and between them Python walks
the modules: ~2.5 ms of a ~15 ms step on a 2-core Xeon, more when the weights streaming through the caches
have evicted the interpreter's own data. The step's shapes are static (DESIGN.md, "The decode step") and its
buffers stay allocated, so, as a CUDA graph does, it can be recorded once and replayed: `record(fn)` runs
fn() once and keeps, in program order,

- every call into the C kernels (csrc/), with its arguments (pointers into tensors that stay allocated);
- every torch op that computes (a gather, an add, the embedding lookup, a dtype conversion), to be rerun
  into the very tensor it produced the first time; in-place ops rerun as they are;
- nothing for views, shape queries or allocations: views alias the replayed buffers, and every tensor the
  step made is kept alive by the tape, so no address changes.

Replay is then a flat loop over those entries, with no module, no wrapper and no allocation. Anything that
would bake a data-dependent choice into the tape (a host read of a tensor: `.item()`, `.tolist()`, `bool`,
`nonzero`) aborts the recording, and the caller runs the step eagerly.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

#: host reads of tensor values: a Python branch may depend on them, which a replay would not retake
HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "__iter__",
              "__len__", "__format__", "__repr__", "cpu", "argwhere", "unique", "masked_select"}
#: queries and allocations: nothing to rerun (an allocation's tensor is kept; its contents are written by later ops)
NO_RERUN = {"__get__", "data_ptr", "stride", "size", "dim", "numel", "is_contiguous", "element_size", "storage_offset",
            "untyped_storage", "empty", "empty_like", "empty_strided", "new_empty", "__setstate__"}
#: factories whose contents matter: restored before each replay, in case an in-place op wrote them
FILLED = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "tensor", "new_zeros",
          "new_ones", "new_full", "new_tensor"}


#: in-place operators spelled as dunders (a name ending in "_" is in place otherwise)
IN_PLACE = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__", "__iand__", "__ixor__"}


class Uncapturable(RuntimeError):
    """The step read a tensor's value on the host (or did something else a replay cannot repeat)."""


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    return []


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Tape(TorchFunctionMode):
    """Records a step; `replay()` repeats it. Native calls are recorded by `native(fn, args)` (see record)."""

    def __init__(self):
        super().__init__()
        self.entries: list = []
        self.keep: list[torch.Tensor] = []  # every tensor the step made: their addresses are in the entries
        self.native_calls = 0

    # ---- recording --------------------------------------------------------------------------
    def native(self, fn, args) -> None:
        self.entries.append((fn, args))
        self.native_calls += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise Uncapturable(f"the step reads a tensor on the host ({name})")
        out = func(*args, **kwargs)
        if name in NO_RERUN:
            self.keep.extend(_tensors(out))
            return out
        if name in IN_PLACE:
            self.entries.append((lambda f=func, a=args, k=kwargs: f(*a, **k), ()))
            return out
        outs = _tensors(out)
        if not outs:
            return out
        self.keep.extend(outs)
        if name in FILLED:
            for t in outs:
                self.entries.append((t.copy_, (t.clone(),)))
            return out
        inputs = _tensors(args) + _tensors(kwargs)
        if name.endswith("_") and not name.startswith("__"):  # in place: rerun as it is
            self.entries.append((lambda f=func, a=args, k=kwargs: f(*a, **k), ()))
            return out
        shared = {_storage(t) for t in inputs}
        fresh = [i for i, t in enumerate(outs) if _storage(t) not in shared]
        if not fresh:  # a view (or the input itself): it aliases what the replay refreshes
            return out
        if len(fresh) != len(outs):
            raise Uncapturable(f"{name} returns a mix of views and new tensors")

        self.entries.append(_into(func, name, args, kwargs, outs))
        return out

    # ---- replay -----------------------------------------------------------------------------
    def replay(self) -> None:
        with torch.inference_mode():  # what the step made are inference tensors; reruns write into them
            for fn, args in self.entries:
                fn(*args)


#: operators with an out= form in torch, for rerunning straight into the recorded tensor (no allocation, no copy)
OUT_FORMS = {"add": torch.add, "__add__": torch.add, "__radd__": torch.add, "sub": torch.sub, "__sub__": torch.sub,
             "mul": torch.mul, "__mul__": torch.mul, "__rmul__": torch.mul, "le": torch.le, "__le__": torch.le,
             "lt": torch.lt, "__lt__": torch.lt, "ge": torch.ge, "__ge__": torch.ge, "gt": torch.gt, "__gt__": torch.gt,
             "eq": torch.eq, "__eq__": torch.eq, "cat": torch.cat, "stack": torch.stack}
#: conversions and copies: rerun as a copy of the source into the recorded tensor
COPIES = {"float", "bfloat16", "half", "double", "to", "type", "contiguous", "clone"}


def _into(func, name, args, kwargs, outs):
    """The cheapest rerun of a computing op that gives exactly its first result: an out= form, a copy of the source,
    or the op itself with its result copied in. The fast forms are checked against the recorded result once."""

    def rerun(f=func, a=args, k=kwargs, targets=outs):
        for t, new in zip(targets, _tensors(f(*a, **k))):
            t.copy_(new)

    fast = None
    if len(outs) == 1:
        target = outs[0]
        if name in OUT_FORMS and set(kwargs) <= {"alpha", "dim"}:
            fast = (lambda g=OUT_FORMS[name], a=args, k=kwargs, t=target: g(*a, **k, out=t))
        elif name in COPIES and args and isinstance(args[0], torch.Tensor) and args[0].shape == target.shape:
            fast = (lambda src=args[0], t=target: t.copy_(src))
    if fast is not None:
        want = outs[0].clone()
        try:
            fast()
            if torch.equal(outs[0], want):
                return fast, ()
        except (TypeError, RuntimeError):
            pass
        outs[0].copy_(want)
    return rerun, ()


class _RecordingLib:
    """Stands in for a Native object's ctypes library while a step is recorded: each call runs and is kept."""

    def __init__(self, lib, tape: Tape):
        self._lib, self._tape = lib, tape

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if not name.startswith("dsv3_") or name == "dsv3_isa":
            return fn

        def call(*args):
            self._tape.native(fn, args)
            return fn(*args)

        return call


def record(fn, native) -> tuple[Tape, object]:
    """Run fn() once under a tape (native: the Native object whose C calls the step makes). Returns (tape, fn's
    result); raises Uncapturable when the step cannot be replayed."""
    tape = Tape()
    real = native.lib
    native.lib = _RecordingLib(real, tape)
    try:
        with torch.inference_mode(), tape:
            out = fn()
    finally:
        native.lib = real
    tape.keep.extend(_tensors(out))
    return tape, out


def check(tape: Tape, out) -> None:
    """Replay once on the recorded inputs: the same bits as the recording, or Uncapturable (an op whose result shape
    or value the tape cannot reproduce, such as a data-dependent one)."""
    want = [t.clone() for t in _tensors(out)]
    try:
        tape.replay()
    except RuntimeError as e:
        raise Uncapturable(f"its replay failed: {str(e).splitlines()[0]}") from None
    if not all(torch.equal(a, b) for a, b in zip(_tensors(out), want)):
        raise Uncapturable("its replay does not reproduce the recorded result")
