"""e4m3fn -> e4m3fnuz checkpoints for MI300-class GPUs; numerically identical after dequant."""

from __future__ import annotations

import torch

from ..core.fp8 import fn_to_fnuz
from .common import Output, Source, copy_small_files, job, write_json
from .dequant import fp8_weights_and_scales
from .shards import read, require_fp8, rewrite_shards, write_index


def fnuz(src_path, dst_path, force: bool = False, resume: bool = False, quiet: bool = False) -> None:
    src = Source.open(src_path, "fnuz", mapped=True)
    require_fp8(src, "fnuz")
    fp8 = fp8_weights_and_scales(src)
    scale_of = {s: w for w, s in fp8.items()}
    out = Output(dst_path, src.path, force, resume, job("fnuz", src))

    def rule(name, info):
        # the reader refuses fn NaN bytes (0x7F/0xFF), which have no fnuz equivalent, naming tensor and file
        if name in fp8:
            return torch.float8_e4m3fnuz, lambda: fn_to_fnuz(read(src, name), None)[0]
        if name in scale_of:
            return torch.float32, lambda: read(src, name).float() * 2
        return info.dtype, lambda: read(src, name)

    with out.writing():
        weight_map, total_size = rewrite_shards(src, out, rule, "fnuz", quiet)
        write_index(out, weight_map, total_size)
        copy_small_files(src.path, out, skip={"config.json"})
        write_json(out.path("config.json"), src.config)
        out.commit()
