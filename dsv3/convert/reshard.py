"""HF layout -> the official demo's model-parallel files, streaming.

`model{r}-mp{N}.safetensors` hold exactly the tensors the demo's convert.py writes (names, split
rules, values); the MTP layer, which the demo drops, goes to `mtp{r}-mp{N}.safetensors` with the
same rules. All N files are open at once and written tensor by tensor in one pass over the input,
so memory holds one input tensor, never a rank's worth.
"""

from __future__ import annotations

import re

import torch

from ..backends.cpu.native import dequantize  # core.fp8.dequantize in one C pass where built
from ..core import names as N
from ..core.errors import DsvError
from ..core.fp8 import BLOCK, is_fp8
from ..core.safetensors_io import StreamingWriter
from .common import Output, Progress, Source, check_space, copy_small_files, job, write_json
from .shards import _nbytes, read

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _divisors_ok(n: int, limit: int = 1024) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def check_sizes(config: dict, mp: int) -> None:
    """Experts, heads, vocab and MLP widths must divide by mp; name the first that does not."""
    dims = [("n_routed_experts", config.get("n_routed_experts") or 0), ("num_attention_heads", config["num_attention_heads"]),
            ("vocab_size", config["vocab_size"]), ("intermediate_size", config["intermediate_size"]),
            ("moe_intermediate_size", (config.get("moe_intermediate_size") or 0) * (config.get("n_shared_experts") or 0))]
    dims = [(k, v) for k, v in dims if v]
    for key, value in dims:
        if value % mp:
            ok = [d for d in _divisors_ok(value) if all(v % d == 0 for _, v in dims)]
            raise DsvError(f"reshard: {key}={value} is not divisible by --model-parallel {mp}; use one of "
                           f"{', '.join(map(str, ok[:12]))}")


def reshard(src_path, dst_path, mp: int, dtype: str | None = None, force: bool = False, resume: bool = False,
            quiet: bool = False) -> None:
    if mp < 1:
        raise DsvError(f"--model-parallel {mp}; use 1 or more")
    src = Source.open(src_path, "reshard")
    config = src.config
    L = config["num_hidden_layers"]  # validated by Source.open
    check_sizes(config, mp)
    has_fp8 = any(is_fp8(info.dtype) for _, info in src.where.values())
    dtype = dtype or ("fp8" if has_fp8 else "bf16")
    if dtype not in ("fp8", "bf16"):
        raise DsvError(f"--dtype {dtype!r}; use fp8 (keep the released weights) or bf16")
    if dtype == "fp8" and not has_fp8:
        raise DsvError(f"{src.path}: has no FP8 weights; reshard it with --dtype bf16")
    dequant = dtype == "bf16" and has_fp8
    n_experts = config.get("n_routed_experts") or 0
    per_rank_experts = n_experts // mp if n_experts else 0

    # ---- plan: for every input tensor, which files get which slice --------------------------
    plan = []  # (hf name, demo name, split dim, expert owner rank or None, kind "model"/"mtp")
    specs: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
    for name in sorted(src.where):
        info = src.where[name][1]
        if dequant and name.endswith("_scale_inv"):
            continue
        try:
            demo = N.hf_to_demo(name)
        except N.UnknownTensor:
            raise DsvError(f"reshard: {name} is not a DeepSeek-V3 tensor name; cannot place it") from None
        m = _LAYER.match(name)
        kind = "mtp" if m and int(m.group(1)) >= L else "model"
        expert = N.expert_id(demo)
        owner = expert // per_rank_experts if expert is not None else None
        dim = N.split_dim(demo)
        shape = list(info.shape)
        if dim is not None:
            if shape[dim] % mp:
                raise DsvError(f"reshard: {name} dim {dim} ({shape[dim]}) is not divisible by --model-parallel {mp}")
            shape[dim] //= mp
            if is_fp8(info.dtype) and not dequant and mp > 1 and shape[dim] % BLOCK:
                full = info.shape[dim]
                ok = [d for d in _divisors_ok(full) if (full // d) % BLOCK == 0]
                fix = f"use --model-parallel in {ok} or --dtype bf16" if ok else "use --dtype bf16"
                raise DsvError(f"reshard: {name}: splitting dim {dim} ({full}) into {mp} parts cuts through 128x128 "
                               f"scale blocks; {fix}")
        out_dtype = torch.bfloat16 if dequant and is_fp8(info.dtype) else info.dtype
        plan.append((name, demo, dim, owner, kind))
        for r in range(mp):
            if owner is not None and owner != r:
                continue
            specs.setdefault(f"{kind}{r}-mp{mp}.safetensors", {})[demo] = (out_dtype, tuple(shape))
    out = Output(dst_path, src.path, force, resume, job("reshard", src, model_parallel=mp, dtype=dtype))
    total = sum(_nbytes(d, s) for f in specs.values() for d, s in f.values())
    check_space(out, total)
    todo = {f: s for f, s in specs.items() if not out.already_done(f)}
    progress = Progress(total, len(specs), f"reshard mp{mp}", quiet)
    for f in specs:
        if f not in todo:
            progress.bytes(sum(_nbytes(d, s) for d, s in specs[f].values()))
            progress.file_done()
    writers = {}
    try:
        with out.writing():
            writers = {f: StreamingWriter(out.path(f), s, {"format": "pt"}) for f, s in todo.items()}
            _write(src, out, plan, writers, mp, dequant, progress)
            copy_small_files(src.path, out, skip={"config.json"})
            if dequant:
                config = {k: v for k, v in config.items() if k != "quantization_config"}
                config["torch_dtype"] = "bfloat16"
            write_json(out.path("config.json"), config)
            out.commit()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        progress.close()


def _write(src: Source, out: Output, plan: list, writers: dict, mp: int, dequant: bool, progress: Progress) -> None:
    for name, demo, dim, owner, kind in plan:
        targets = [r for r in range(mp) if (owner is None or owner == r) and f"{kind}{r}-mp{mp}.safetensors" in writers]
        if not targets:
            continue
        t = read(src, name)
        if dequant and is_fp8(t.dtype):
            t = dequantize(t, read(src, name + "_scale_inv").float(), torch.bfloat16)
        for r in targets:
            part = t if dim is None else t.narrow(dim, r * (t.shape[dim] // mp), t.shape[dim] // mp).contiguous()
            writers[f"{kind}{r}-mp{mp}.safetensors"].write(demo, part)
            progress.bytes(part.numel() * part.element_size())
    for f, w in writers.items():
        w.close()
        out.finished(f, w.sha256)
        progress.file_done()
