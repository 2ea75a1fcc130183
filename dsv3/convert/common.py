"""What every conversion shares: the source view, safe atomic resumable output, progress, manifest.

Output goes to a sibling `.<DST>.partial` directory and is renamed into place at the end, so an
interrupted run never leaves a DST that looks complete. The partial directory's progress file
records the job (command, options, a fingerprint of the source) and each finished file with its
sha256; `--resume` continues only the same job on the same source, re-hashing what it skips.

`--force` replaces only what dsv3 itself wrote: an empty DST or an earlier `dsv3 convert` output
(recognised by its manifest, holding nothing the manifest does not list). Never a symlink, the
current directory, the home directory, or a directory that contains SRC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.checkpoint import INDEX, Checkpoint, validate
from ..core.config import ModelConfig
from ..core.errors import CheckpointError, DsvError
from ..core.safetensors_io import TensorInfo

MANIFEST = "dsv3-manifest.json"
PROGRESS = ".dsv3-progress.json"
SMALL_FILES_SKIP = {INDEX, MANIFEST, PROGRESS}


@dataclass
class Source:
    """A validated HF-layout checkpoint: every tensor's shard and header entry, from the index."""

    path: Path
    config: dict
    where: dict[str, tuple[Path, TensorInfo]]  # HF tensor name -> (shard, info)
    shards: list[Path]
    ckpt: Checkpoint

    @classmethod
    def open(cls, path: str | Path, command: str, mapped: bool = False) -> "Source":
        """Accepts exactly what `dsv3 run` accepts (same reader, same validator), in the HF layout.
        `mapped`: read through memory maps, for conversions that go shard by shard and release
        each shard's map when done (RSS stays about one shard)."""
        path = Path(path)
        cfg = ModelConfig.from_file(path)
        ckpt = Checkpoint(path)
        if ckpt.layout != "hf":
            raise DsvError(f"{path}: holds model-parallel rank files; `convert {command}` takes the HF layout "
                           f"(config.json, {INDEX} and shards)")
        validate(ckpt, cfg)
        ckpt.mapped = mapped
        return cls(path, cfg.raw, dict(ckpt.hf), sorted({p for p, _ in ckpt.hf.values()}), ckpt)

    def read(self, name: str) -> torch.Tensor:
        """One tensor by HF name, values checked (NaN bytes, scales) by the checkpoint's reader."""
        return self.ckpt.read_part(*self.where[name])

    def names_in(self, shard: Path) -> list[str]:
        return [n for n, (s, _) in self.where.items() if s == shard]

    def fingerprint(self) -> dict:
        """What identifies the source for --resume: config and index bytes, each shard's size and mtime."""
        def digest(p: Path) -> str | None:
            return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None

        shards = {}
        for p in self.shards:
            st = p.stat()
            shards[p.name] = [st.st_size, st.st_mtime_ns]
        return {"path": str(self.path.resolve()), "config": digest(self.path / "config.json"),
                "index": digest(self.path / INDEX), "shards": shards}


class Output:
    """Safe, atomic, resumable output directory for one job (a dict: command, options, source)."""

    def __init__(self, dst: str | Path, src: Path, force: bool, resume: bool, job: dict):
        self.dst = Path(dst)
        guard_dst(self.dst, src, force)
        self.tmp = self.dst.parent / f".{self.dst.name}.partial"
        self.progress_path = self.tmp / PROGRESS
        self.job = job
        self.done: dict[str, dict] = {}
        if self.tmp.is_symlink() or (self.tmp.exists() and not self.tmp.is_dir()):
            raise DsvError(f"{self.tmp}: exists and is not a directory dsv3 made; move it away and rerun")
        if self.tmp.exists():
            state = self._read_state()
            if resume:
                _same_job(state.get("job"), job, self.tmp)
                self.done = state.get("files", {})
            else:
                shutil.rmtree(self.tmp)  # an earlier, unfinished run of ours: start over
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._save()

    def _read_state(self) -> dict:
        """The progress file of an earlier run; a directory without one is not ours to delete."""
        if not self.progress_path.is_file():
            if any(self.tmp.iterdir()):
                raise DsvError(f"{self.tmp}: exists but was not made by dsv3 convert (no {PROGRESS}); move it away "
                               "and rerun")
            return {}
        try:
            state = json.loads(self.progress_path.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("files", {}), dict):
                raise ValueError
            return state
        except (ValueError, UnicodeDecodeError):
            raise DsvError(f"{self.progress_path}: unreadable progress file; rerun without --resume to start over") from None

    def _save(self) -> None:
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"job": self.job, "files": self.done}, indent=1))
        os.replace(tmp, self.progress_path)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def done_bytes(self) -> int:
        """Bytes already written by an interrupted run that --resume keeps (counted off the space needed)."""
        return sum(e.get("size", 0) for n, e in self.done.items() if (self.tmp / n).is_file())

    def already_done(self, name: str) -> bool:
        """A file counts as done only if it is on disk with the hash recorded when it was finished."""
        entry = self.done.get(name)
        p = self.tmp / name
        return bool(entry) and p.is_file() and p.stat().st_size == entry["size"] and sha256(p) == entry["sha256"]

    def finished(self, name: str, digest: str | None = None) -> None:
        p = self.tmp / name
        self.done[name] = {"size": p.stat().st_size, "sha256": digest or sha256(p)}
        self._save()

    @contextmanager
    def writing(self):
        """Turn a full disk into one line that names where and what to do; drop the partial output
        when the source itself is bad (no --resume can finish it)."""
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(self.tmp).free
                raise DsvError(f"{self.tmp}: no space left on device ({free / 1e9:.2f} GB free); free space, then rerun "
                               "the same command with --resume (finished files are kept)") from None
            raise
        except CheckpointError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def commit(self) -> None:
        """Write the manifest and move the finished tree into place (an old DST is set aside first,
        then removed, so a crash in between loses neither)."""
        manifest = {"job": self.job, "files": {}}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file() and p.name not in (PROGRESS, MANIFEST):
                rel = str(p.relative_to(self.tmp))
                entry = self.done.get(rel) or {"size": p.stat().st_size, "sha256": sha256(p)}
                manifest["files"][rel] = entry
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        self.progress_path.unlink(missing_ok=True)
        old = None
        if self.dst.exists() and any(self.dst.iterdir()):
            old = self.dst.parent / f".{self.dst.name}.replaced-{os.getpid()}"
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old is not None:
            shutil.rmtree(old)


def guard_dst(dst: Path, src: Path, force: bool) -> None:
    """Refuse, in one line, any DST whose replacement could lose data that dsv3 did not write."""
    if dst.is_symlink():
        raise DsvError(f"{dst}: is a symbolic link; give the real directory (dsv3 never writes through a symlink)")
    real, src_real = dst.resolve(), src.resolve()
    if real == src_real or src_real in real.parents:
        raise DsvError(f"{dst}: DST must not be SRC or inside it; SRC is never modified")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise DsvError(f"{dst}: exists and is a file; choose a directory path for DST")
    for what, p in (("SRC", src_real), ("the current directory", Path.cwd().resolve()), ("your home directory",
                                                                                       Path.home().resolve())):
        if p == real or real in p.parents:
            raise DsvError(f"{dst}: refusing to replace a directory that {'is' if p == real else 'contains'} {what}; "
                           "choose a new directory for DST")
    entries = sorted(p.name for p in dst.iterdir())
    if not entries:
        return
    if not force:
        raise DsvError(f"{dst}: exists and is not empty; choose another DST, or pass --force to replace an earlier "
                       "dsv3 convert output")
    manifest = dst / MANIFEST
    if not manifest.is_file():
        raise DsvError(f"{dst}: --force replaces only an earlier dsv3 convert output, and this directory has no "
                       f"{MANIFEST} (it holds {entries[0]!r}{' and more' if len(entries) > 1 else ''}); "
                       "remove it yourself or choose another DST")
    try:
        listed = json.loads(manifest.read_text())["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise DsvError(f"{manifest}: unreadable manifest; not replacing {dst}, remove it yourself") from None
    for p in sorted(dst.rglob("*")):
        rel = str(p.relative_to(dst))
        if p.is_symlink() or (p.is_file() and rel not in listed and rel != MANIFEST):
            raise DsvError(f"{dst}: holds {rel!r}, which dsv3 convert did not write; move it out or choose another "
                           "DST (--force replaces only dsv3's own files)")


def _same_job(old: dict | None, new: dict, tmp: Path) -> None:
    if old is None:
        raise DsvError(f"{tmp}: no record of the interrupted job; rerun without --resume to start over")
    for key in ("command", "options"):
        if old.get(key) != new.get(key):
            raise DsvError(f"--resume: {tmp} was started with {key} {old.get(key)}, now {new.get(key)}; rerun with "
                           "the same ones, or without --resume to start over")
    a, b = old.get("source", {}), new.get("source", {})
    for key in ("path", "config", "index", "shards"):
        if a.get(key) != b.get(key):
            what = {"path": "another SRC", "config": "config.json changed", "index": "the index changed",
                    "shards": "shard files changed (size or modification time)"}[key]
            raise DsvError(f"--resume: the source is not the one the interrupted run read ({what}); rerun without "
                           "--resume to start over")


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


def check_space(out: Output, needed: int) -> None:
    """Refuse up front when the output cannot fit; a resumed run needs only what is not written yet."""
    remaining = max(0, needed - out.done_bytes())
    free = shutil.disk_usage(out.tmp).free
    if remaining > free:
        kept = f" ({out.done_bytes() / 1e9:.2f} GB already written is kept)" if out.done else ""
        raise DsvError(
            f"{out.dst.parent}: not enough disk space: the output needs {remaining / 1e9:.2f} GB more{kept}, "
            f"{free / 1e9:.2f} GB free; free space or choose another DST"
        )


class Progress:
    """A bar over output bytes with files done and throughput; silent with --quiet or when not a terminal."""

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


def job(command: str, src: Source, **options) -> dict:
    return {"command": command, "options": options, "source": src.fingerprint()}
