"""Check that a checkpoint's index, shards and config agree; report every problem found."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.config import ModelConfig
from ..core.errors import DsvError
from ..core.fp8 import FP8_DTYPES
from ..core.names import expected_hf_tensors
from ..core.safetensors_io import read_header, read_tensor
from .common import INDEX, MANIFEST, sha256

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def verify(path: str | Path, checksums: bool = False) -> list[str]:
    """All problems found (empty list: the checkpoint is consistent)."""
    path = Path(path)
    problems: list[str] = []
    try:
        cfg = ModelConfig.from_file(path)
    except DsvError as e:
        return [str(e)]
    index_path = path / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return [f"{index_path}: unreadable index (no weight_map)"]
    elif (path / "model.safetensors").is_file():
        weight_map = None
    else:
        return [f"{path}: no {INDEX} or model.safetensors"]

    headers = {}
    files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    for fname in files:
        if not (path / fname).is_file():
            problems.append(f"{path / fname}: missing shard named by {INDEX}")
            continue
        try:
            headers[fname], _ = read_header(path / fname)
        except DsvError as e:
            problems.append(str(e))
    if weight_map is None:
        weight_map = {n: "model.safetensors" for n in headers.get("model.safetensors", {})}
    infos = {}
    for name, fname in weight_map.items():
        if fname in headers:
            if name not in headers[fname]:
                problems.append(f"{fname}: {INDEX} lists {name} here but the shard does not have it")
            else:
                infos[name] = (fname, headers[fname][name])
    for fname, h in headers.items():
        for name in h:
            if weight_map.get(name) != fname:
                problems.append(f"{fname}: holds {name}, which {INDEX} does not list there")

    fp8 = any(i.dtype in FP8_DTYPES for _, i in infos.values())
    expected = expected_hf_tensors(cfg, fp8=fp8)
    main_only = expected_hf_tensors(cfg, fp8=fp8, with_mtp=False)
    if not any(n in infos for n in set(expected) - set(main_only)):
        expected = main_only  # MTP absent altogether is allowed (the demo drops it)
    for name, spec in expected.items():
        if name not in infos:
            if not any(name == n for n in weight_map):
                problems.append(f"missing {'scale' if spec.role == 'scale' else 'tensor'} {name}")
            continue
        fname, info = infos[name]
        if tuple(info.shape) != spec.shape:
            problems.append(f"{name}: shape {list(info.shape)}, config implies {list(spec.shape)}")
        if spec.role == "scale":
            if info.dtype != torch.float32:
                problems.append(f"{name}: scale dtype {info.dtype}, expected float32")
            elif not torch.isfinite(read_tensor(path / fname, info)).all():
                problems.append(f"{name}: scale has NaN or Inf values")
        elif spec.role == "linear":
            ok = FP8_DTYPES if fp8 else FLOAT_DTYPES
            if info.dtype not in ok:
                problems.append(f"{name}: dtype {info.dtype}, expected one of {[str(d) for d in ok]}")
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: dtype {info.dtype}, expected a float dtype")
    for name in sorted(set(infos) - set(expected)):
        problems.append(f"unexpected tensor {name} for this config.json")

    if checksums:
        mpath = path / MANIFEST
        if not mpath.is_file():
            problems.append(f"{mpath}: no manifest (only checkpoints written by dsv3 convert have one)")
        else:
            manifest = json.loads(mpath.read_text())["files"]
            for rel, entry in manifest.items():
                p = path / rel
                if not p.is_file():
                    problems.append(f"{rel}: listed in the manifest but missing")
                elif p.stat().st_size != entry["size"] or sha256(p) != entry["sha256"]:
                    problems.append(f"{rel}: contents differ from the manifest (sha256 mismatch)")
    return problems
