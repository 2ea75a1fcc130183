"""FP8 -> BF16 (or fp16/fp32) in the HF layout, on any machine: round(fp8 x scale) in fp32, cast once."""

from __future__ import annotations

import torch

from ..backends.cpu.native import dequantize  # core.fp8.dequantize in one C pass where built
from ..core.errors import DsvError
from .common import Output, Source, copy_small_files, job, write_json
from .shards import read, require_fp8, rewrite_shards, write_index

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SCALE = "_scale_inv"


def fp8_weights_and_scales(src: Source) -> dict[str, str]:
    """FP8 weight name -> its scale name (the validator has made sure every FP8 weight has one)."""
    return {name: name + SCALE for name, (_, info) in src.where.items() if info.dtype == torch.float8_e4m3fn}


def dequant(src_path, dst_path, dtype: str = "bf16", force: bool = False, resume: bool = False,
            quiet: bool = False) -> None:
    if dtype not in DTYPES:
        raise DsvError(f"--dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    src = Source.open(src_path, "dequant", mapped=True)
    require_fp8(src, "dequant")
    fp8 = fp8_weights_and_scales(src)
    scales = set(fp8.values())
    out = Output(dst_path, src.path, force, resume, job("dequant", src, dtype=dtype))

    def rule(name, info):
        if name in scales:
            return None
        if name in fp8:
            return target, lambda: dequantize(read(src, name), read(src, fp8[name]).float(), target)
        return info.dtype, lambda: read(src, name)  # copied as is (the fp32 gate bias stays fp32)

    with out.writing():
        weight_map, total_size = rewrite_shards(src, out, rule, "dequant", quiet)
        write_index(out, weight_map, total_size)
        copy_small_files(src.path, out, skip={"config.json"})
        config = dict(src.config)
        config.pop("quantization_config", None)  # other tools refuse a BF16 checkpoint that keeps it
        config["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]
        write_json(out.path("config.json"), config)
        out.commit()
