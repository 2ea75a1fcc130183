"""What every conversion shares: the source view, atomic and resumable output, progress, manifest.

Output goes to a sibling `.<DST>.partial` directory and is renamed into place at the end, so an
interrupted run never leaves a DST that looks complete. Each finished file is recorded with its
sha256 in the partial directory's progress file; `--resume` re-hashes and skips those.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DsvError
from ..core.safetensors_io import TensorInfo, read_header

MANIFEST = "dsv3-manifest.json"
PROGRESS = ".dsv3-progress.json"
INDEX = "model.safetensors.index.json"
SMALL_FILES_SKIP = {INDEX, MANIFEST, PROGRESS}


@dataclass
class Source:
    """An HF-layout checkpoint: every tensor's shard and header entry, from the index."""

    path: Path
    config: dict
    where: dict[str, tuple[Path, TensorInfo]]  # tensor name -> (shard, info)
    shards: list[Path]

    @classmethod
    def open(cls, path: str | Path) -> "Source":
        path = Path(path)
        if not path.is_dir():
            raise DsvError(f"{path}: no such checkpoint directory")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise DsvError(f"{path}: no config.json; point at a checkpoint directory")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise DsvError(f"{cfg_path}: not valid JSON ({e})") from None
        if (path / INDEX).is_file():
            try:
                weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DsvError(f"{path / INDEX}: unreadable index (no weight_map)") from None
        elif (path / "model.safetensors").is_file():
            infos, _ = read_header(path / "model.safetensors")
            weight_map = {n: "model.safetensors" for n in infos}
        else:
            raise DsvError(f"{path}: no {INDEX} or model.safetensors; is this an HF-layout checkpoint?")
        where: dict[str, tuple[Path, TensorInfo]] = {}
        headers: dict[str, dict[str, TensorInfo]] = {}
        for name, fname in weight_map.items():
            shard = path / fname
            if fname not in headers:
                if not shard.is_file():
                    raise DsvError(f"{shard}: missing shard named by {INDEX} (e.g. for {name}); re-download it")
                headers[fname], _ = read_header(shard)
            if name not in headers[fname]:
                raise DsvError(f"{shard}: {INDEX} puts {name} here but the shard does not have it")
            where[name] = (shard, headers[fname][name])
        shards = sorted({path / f for f in headers})
        return cls(path, config, where, shards)

    def names_in(self, shard: Path) -> list[str]:
        return [n for n, (s, _) in self.where.items() if s == shard]


class Output:
    """Atomic, resumable output directory."""

    def __init__(self, dst: str | Path, src: Path, force: bool, resume: bool):
        self.dst = Path(dst)
        if self.dst.resolve() == src.resolve() or src.resolve() in self.dst.resolve().parents:
            raise DsvError(f"{self.dst}: DST must not be SRC or inside it; SRC is never modified")
        self.tmp = self.dst.parent / f".{self.dst.name}.partial"
        if self.dst.exists() and (not self.dst.is_dir() or any(self.dst.iterdir())) and not force:
            raise DsvError(f"{self.dst}: exists and is not empty; choose another DST or pass --force to replace it")
        if self.tmp.exists() and not resume:
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.progress_path = self.tmp / PROGRESS
        self.done: dict[str, dict] = {}
        if resume and self.progress_path.is_file():
            try:
                self.done = json.loads(self.progress_path.read_text())
            except json.JSONDecodeError:
                self.done = {}

    def path(self, name: str) -> Path:
        return self.tmp / name

    def already_done(self, name: str) -> bool:
        """A file counts as done only if it is on disk with the hash recorded when it was finished."""
        entry = self.done.get(name)
        p = self.tmp / name
        return bool(entry) and p.is_file() and p.stat().st_size == entry["size"] and sha256(p) == entry["sha256"]

    def finished(self, name: str, digest: str | None = None) -> None:
        p = self.tmp / name
        self.done[name] = {"size": p.stat().st_size, "sha256": digest or sha256(p)}
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        os.replace(tmp, self.progress_path)
        stop = os.environ.get("DSV3_CONVERT_STOP_AFTER_FILES")  # test hook: simulates a kill mid-run
        if stop and len(self.done) >= int(stop):
            os._exit(137)

    def commit(self) -> None:
        """Write the manifest and move the finished tree into place."""
        manifest = {"files": {}}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file() and p.name not in (PROGRESS, MANIFEST):
                rel = str(p.relative_to(self.tmp))
                entry = self.done.get(rel) or {"size": p.stat().st_size, "sha256": sha256(p)}
                manifest["files"][rel] = entry
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        self.progress_path.unlink(missing_ok=True)
        if self.dst.exists():
            shutil.rmtree(self.dst) if self.dst.is_dir() else self.dst.unlink()
        os.replace(self.tmp, self.dst)


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def copy_small_files(src: Path, out: Output, skip: set[str] = frozenset()) -> None:
    """Tokenizer, generation config and other non-weight files (config.json is rewritten by the caller)."""
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in SMALL_FILES_SKIP | set(skip):
            shutil.copy2(p, out.path(p.name))


def check_space(dst_parent: Path, needed: int) -> None:
    dst_parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst_parent).free
    if needed > free:
        raise DsvError(
            f"{dst_parent}: not enough disk space: the output needs {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB free; "
            "free space or choose another DST"
        )


class Progress:
    """A bar over bytes with files done and throughput; silent with --quiet or when not a terminal."""

    def __init__(self, total_bytes: int, n_files: int, desc: str, quiet: bool):
        self.n_files, self.files = n_files, 0
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                            disable=None, dynamic_ncols=True)
            self.bar.set_postfix_str(f"files 0/{n_files}")

    def bytes(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def file_done(self) -> None:
        self.files += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"files {self.files}/{self.n_files}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
