"""e4m3fn -> e4m3fnuz checkpoints for MI300-class GPUs; numerically identical after dequant."""

from __future__ import annotations

import json

import torch

from ..core.errors import DsvError
from ..core.safetensors_io import read_tensor
from .common import Output, Progress, Source, copy_small_files, write_json
from .dequant import fp8_weights_and_scales
from .fnuz_math import fn_nan_count, fn_to_fnuz
from .shards import read, require_fp8, rewrite_shards, write_index


def fnuz(src_path, dst_path, force: bool = False, resume: bool = False, quiet: bool = False) -> None:
    src = Source.open(src_path)
    require_fp8(src, "fnuz")
    fp8 = fp8_weights_and_scales(src, allow_missing_scale=False)
    for name in fp8:  # report NaN bytes before writing anything
        path, info = src.where[name]
        n = fn_nan_count(read_tensor(path, info))
        if n:
            raise DsvError(f"{name}: {n} NaN bytes (0x7F/0xFF) in an e4m3fn weight have no e4m3fnuz equivalent; "
                           "the source is corrupt, re-download that shard")
    scale_of = {s: w for w, s in fp8.items()}
    out = Output(dst_path, src.path, force, resume)

    def rule(name, info):
        if name in fp8:
            return torch.float8_e4m3fnuz, lambda: fn_to_fnuz(read(src, name), None)[0]
        if name in scale_of:
            return torch.float32, lambda: read(src, name).float() * 2
        return info.dtype, lambda: read(src, name)

    progress = Progress(sum(i.nbytes for _, i in src.where.values()), len(src.shards), "fnuz", quiet)
    try:
        weight_map, total_size = rewrite_shards(src, out, rule, progress)
        write_index(out, weight_map, total_size)
        copy_small_files(src.path, out, skip={"config.json"})
        config = json.loads((src.path / "config.json").read_text())
        write_json(out.path("config.json"), config)
        out.commit()
    finally:
        progress.close()
