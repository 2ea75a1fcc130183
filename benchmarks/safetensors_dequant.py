"""The FP8 -> BF16 conversion a user writes with the `safetensors` library, for comparison.

Load a shard, dequantize each FP8 weight with its 128x128 block scale (looked up through the index:
a scale may live in another shard), save the shard; then the index and config. No validation,
no checksums, no resume: the baseline `convert_throughput.py` holds `dsv3 convert dequant` to.

    python benchmarks/safetensors_dequant.py SRC DST
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def dequant(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    s = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return (w.float() * s).to(torch.bfloat16)


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    new_map = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_file(src / shard)
        out = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                sname = name + "_scale_inv"
                if sname in tensors:
                    scale = tensors[sname]
                else:
                    with safe_open(src / weight_map[sname], "pt") as f:
                        scale = f.get_tensor(sname)
                t = dequant(t, scale)
            out[name] = t
            new_map[name] = shard
        save_file(out, dst / shard, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(p, dst / p.name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
