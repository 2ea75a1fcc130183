"""FP8 -> BF16 (or fp16/fp32) in the HF layout, on any machine: round(fp8 x scale) in fp32, cast once."""

from __future__ import annotations

import json
import logging

import torch

from ..core.errors import DsvError
from ..core.fp8 import dequantize
from .common import Output, Progress, Source, copy_small_files, write_json
from .shards import read, require_fp8, rewrite_shards, write_index

log = logging.getLogger("dsv3")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SCALE = "_scale_inv"


def fp8_weights_and_scales(src: Source, allow_missing_scale: bool) -> dict[str, str | None]:
    """FP8 weight name -> its scale name (None when missing and allowed through)."""
    out = {}
    for name, (_, info) in src.where.items():
        if info.dtype != torch.float8_e4m3fn:
            continue
        scale = name + SCALE
        if scale not in src.where:
            if not allow_missing_scale:
                raise DsvError(
                    f"{name}: FP8 weight without its scale {scale}; re-download the shard, or pass "
                    "--allow-missing-scale to copy it through as FP8"
                )
            log.warning("%s has no scale; copied through as FP8", name)
            scale = None
        out[name] = scale
    return out


def dequant(src_path, dst_path, dtype: str = "bf16", force: bool = False, resume: bool = False,
            quiet: bool = False, allow_missing_scale: bool = False) -> None:
    if dtype not in DTYPES:
        raise DsvError(f"--dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    src = Source.open(src_path)
    require_fp8(src, "dequant")
    fp8 = fp8_weights_and_scales(src, allow_missing_scale)
    scales = {s for s in fp8.values() if s}
    out = Output(dst_path, src.path, force, resume)

    def rule(name, info):
        if name in scales:
            return None
        if fp8.get(name):
            return target, lambda: dequantize(read(src, name), read(src, fp8[name]).float(), target)
        return info.dtype, lambda: read(src, name)  # copied as is (the fp32 gate bias stays fp32)

    total = sum(info.nbytes for _, info in src.where.values())
    progress = Progress(total, len(src.shards), "dequant", quiet)
    try:
        weight_map, total_size = rewrite_shards(src, out, rule, progress)
        write_index(out, weight_map, total_size)
        copy_small_files(src.path, out, skip={"config.json"})
        config = json.loads((src.path / "config.json").read_text())
        if not any(s is None for s in fp8.values()):
            config.pop("quantization_config", None)  # other tools refuse a BF16 checkpoint that keeps it
        config["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]
        write_json(out.path("config.json"), config)
        out.commit()
    finally:
        progress.close()
