"""Shard-by-shard rewriting with a per-tensor rule: the engine behind dequant and fnuz.

Each output shard's header is computed from the input headers before any data is read, then the
shard is written tensor by tensor, so memory holds one input tensor (plus its scale) at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from ..core.errors import DsvError
from ..core.safetensors_io import StreamingWriter, TensorInfo
from .common import INDEX, Output, Progress, Source, check_space, write_json

#: rule(name, info) -> None to drop the tensor, or (out dtype, compute() -> tensor)
Rule = Callable[[str, TensorInfo], "tuple[torch.dtype, Callable[[], torch.Tensor]] | None"]


def rewrite_shards(src: Source, out: Output, rule: Rule, desc: str, quiet: bool) -> tuple[dict[str, str], int]:
    """Apply `rule` to every tensor; returns the new weight map and the bytes of tensor data written."""
    plans = {}
    total = 0
    for shard in src.shards:
        plan = {}
        for name in src.names_in(shard):
            info = src.where[name][1]
            r = rule(name, info)
            if r is not None:
                plan[name] = (r[0], info.shape, r[1])
                total += _nbytes(r[0], info.shape)
        plans[shard] = plan
    check_space(out, total)
    progress = Progress(total, len(plans), desc, quiet)
    try:
        return _write_shards(src, out, plans, progress), total
    finally:
        progress.close()


def _write_shards(src: Source, out: Output, plans: dict, progress: Progress) -> dict[str, str]:
    weight_map = {}
    for shard, plan in plans.items():
        fname = shard.name
        for name in plan:
            weight_map[name] = fname
        if out.already_done(fname):
            progress.bytes(sum(_nbytes(d, s) for d, s, _ in plan.values()))
            progress.file_done()
            continue
        writer = StreamingWriter(out.path(fname), {n: (d, s) for n, (d, s, _) in plan.items()}, {"format": "pt"})
        # one tensor is written and hashed on a thread while the next is computed (both release the GIL);
        # waiting before each hand-off keeps at most two tensors in memory
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            try:
                for name, (dtype, shape, compute) in plan.items():
                    t = compute()
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(writer.write, name, t)
                    progress.bytes(t.numel() * t.element_size())
                if pending is not None:
                    pending.result()
                writer.close()
                t = None  # the last tensor may view the shard's memory map, released below
            except BaseException:
                if pending is not None:
                    wait([pending])  # the file is not closed under a running write
                writer.abort()
                raise
        out.finished(fname, writer.sha256)
        progress.file_done()
        src.ckpt.release(shard)
    return weight_map


def read(src: Source, name: str) -> torch.Tensor:
    return src.read(name)


def write_index(out: Output, weight_map: dict[str, str], total_size: int) -> None:
    write_json(out.path(INDEX), {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def require_fp8(src: Source, command: str) -> None:
    if not any(info.dtype == torch.float8_e4m3fn for _, info in src.where.values()):
        raise DsvError(
            f"{src.path}: no float8_e4m3fn weights; `convert {command}` takes the released FP8 checkpoint "
            "(this one is already dequantized or converted)"
        )


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
