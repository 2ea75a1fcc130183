"""Count the kernels one call launches: Triton launches plus aten ops that run a kernel (views and
allocations excluded), with the aten ops inside a Triton launch (the interpreter's own) not counted.

Runs anywhere, the interpreter included, so the launch budget of the decode step (issue 12: at most
24 per layer) is checked in CI; on a GPU `torch.profiler` gives the same figure from the driver.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {"empty.memory_format", "empty_strided.default", "lift_fresh.default", "detach.default",
             "_local_scalar_dense.default", "set_.source_Storage_storage_offset", "resize_.default"}


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _implementation(name: str):
    from dsv3.backends.cuda import act_quant, fp8_gemm, gate, latent, mla_decode, moe, rms_norm, rope, weight_dequant

    return {"act_quant": act_quant.act_quant, "fp8_gemm": fp8_gemm.fp8_gemm, "mla_decode": mla_decode.mla_decode,
            "fused_moe": moe.fused_moe, "weight_dequant": weight_dequant.weight_dequant, "rope": rope.rope,
            "gate_select": gate.gate_select, "fp8_swiglu": fp8_gemm.fp8_swiglu, "mla_latent": latent.mla_latent,
            "rms_norm": rms_norm.rms_norm, "bf16_linear": fp8_gemm.bf16_linear, "bf16_swiglu": fp8_gemm.bf16_swiglu,
            "fp8_linear": lambda x, b, s, m, u, t, r=None: fp8_gemm.fp8_linear(x, b, s, m, u, x.dtype, t, r)}[name]


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten, self.triton = Counter(), Counter()
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dsv3":  # a registered dsv3 op: count what its Python implementation launches
            with self:
                return _implementation(func.overloadpacket.__name__)(*args, **(kwargs or {}))
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        out = func(*args, **(kwargs or {}))
        if self.inside_triton:
            return out
        if func.overloadpacket.__name__ == "to":
            # aten.to may return its input (a view, no kernel) or convert (a copy kernel); under inference_mode
            # it arrives undecomposed, so tell the two apart by the result
            if isinstance(out, torch.Tensor) and out.data_ptr() != args[0].data_ptr():
                self.aten["_to_copy"] += 1
        elif not _is_view(func) and name not in NO_KERNEL:
            self.aten[func.overloadpacket.__name__] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


@contextmanager
def count_launches():
    """with count_launches() as c: ...; then c.total, c.aten, c.triton."""
    import triton.runtime.jit as jit

    patched = []
    counter = LaunchCounter()
    classes = [jit.JITFunction]
    try:
        import triton.runtime.interpreter as interp

        classes.append(interp.InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            counter.triton[getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "?")] += 1
            counter.inside_triton += 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter.inside_triton -= 1
        cls.run = run
        patched.append((cls, original))
    try:
        with counter:
            yield counter
    finally:
        for cls, original in patched:
            cls.run = original
