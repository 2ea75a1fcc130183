"""Check a checkpoint in any of the three layouts with the loader's own reader and validator, plus
every tensor's bytes and the manifest; report every problem found, not just the first."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.checkpoint import Checkpoint, Problems, validate
from ..core.config import ModelConfig
from ..core.errors import DsvError
from ..core.safetensors_io import read_tensor, value_problem
from .common import MANIFEST, Progress, sha256


def verify(path: str | Path, checksums: bool = False, quiet: bool = True) -> list[str]:
    """All problems found (empty list: the checkpoint is consistent). Reads every tensor: a bar over
    the bytes unless `quiet` (it takes minutes on a 690 GB checkpoint)."""
    path = Path(path)
    problems = Problems(collect=True)
    try:
        cfg = ModelConfig.from_file(path)
    except DsvError as e:
        cfg = None
        problems.add(str(e))
    try:
        ckpt = Checkpoint(path, problems)
    except DsvError as e:
        return [*problems.found, str(e)]
    if cfg is not None:
        validate(ckpt, cfg)
    parts = sorted((part for src in ckpt.sources.values() for part in src.parts), key=lambda p: (p[0], p[2].begin))
    progress = Progress(sum(info.nbytes for _, _, info in parts), len(ckpt.files), "verify", quiet)
    try:
        _check_values(parts, problems, progress)
    finally:
        progress.close()
    _check_manifest(path, checksums, problems)
    return problems.found


def _check_values(parts, problems: Problems, progress: Progress) -> None:
    """Every tensor's bytes, file by file in file order (sequential reads)."""
    for i, (file, name, info) in enumerate(parts):
        progress.bytes(info.nbytes)
        if i + 1 == len(parts) or parts[i + 1][0] != file:
            progress.file_done()
        try:
            t = read_tensor(file, info, check=False)
        except DsvError as e:
            problems.add(str(e))
            continue
        why = value_problem(t, name, thorough=True)
        if why:
            problems.add(f"{file}: tensor {name}: {why}")


def _check_manifest(path: Path, checksums: bool, problems: Problems) -> None:
    mpath = path / MANIFEST
    if not mpath.is_file():
        if checksums:
            problems.add(f"{mpath}: no manifest (only checkpoints written by dsv3 convert have one)")
        return
    try:
        manifest = json.loads(mpath.read_text())["files"]
        if not isinstance(manifest, dict):
            raise TypeError
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        problems.add(f"{mpath}: unreadable manifest")
        return
    for rel, entry in manifest.items():
        p = path / rel
        if not p.is_file():
            problems.add(f"{p}: listed in the manifest but missing")
        elif not isinstance(entry, dict) or p.stat().st_size != entry.get("size"):
            problems.add(f"{p}: size differs from the manifest ({p.stat().st_size} bytes)")
        elif checksums and sha256(p) != entry.get("sha256"):
            problems.add(f"{p}: contents differ from the manifest (sha256 mismatch)")
