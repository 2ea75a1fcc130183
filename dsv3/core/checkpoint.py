"""The one checkpoint reader and the one validator: loading, every conversion and `verify` use both.

Three layouts are accepted (see DESIGN.md): the released HF layout in FP8, the same in BF16, and the
official demo's model-parallel rank files `model{r}-mp{N}.safetensors` (MTP in `mtp{r}-mp{N}`).
Every layout is seen through one view: demo name -> the parts that hold it, headers read (and
validated) up front, data read lazily tensor by tensor.

Problems go to a `Problems` object: loading and converting raise the first one; `verify` collects
them all and keeps going wherever it still can.
"""

from __future__ import annotations

import json
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from . import names as N
from .config import ModelConfig
from .errors import CheckpointError
from .fp8 import FP8_DTYPES, is_fp8
from .parallel import Parallel
from .safetensors_io import TensorInfo, read_header, read_mapped, read_tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
RANK_FILE = re.compile(r"^(model|mtp)(\d+)-mp(\d+)\.safetensors$")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Problems:
    """Where checkpoint problems go: raised at the first (`collect=False`) or all kept (verify)."""

    def __init__(self, collect: bool = False):
        self.collect = collect
        self.found: list[str] = []

    def add(self, msg: str) -> None:
        if not self.collect:
            raise CheckpointError(msg)
        self.found.append(msg)


@dataclass
class Source:
    """Where one demo-named tensor lives: one entry per part (one for HF, N for split rank files)."""

    parts: list[tuple[Path, str, TensorInfo]] = field(default_factory=list)


class Checkpoint:
    """A checkpoint directory seen as demo names -> sources, with every header read and validated."""

    def __init__(self, path: str | Path, problems: Problems | None = None):
        self._handles: dict[Path, object] = {}  # open files (or memory maps), one per file read from
        self.mapped = False
        self.path = Path(path)
        self.problems = problems or Problems()
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such directory; pass a checkpoint directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory; pass the checkpoint directory, not a file")
        self.sources: dict[str, Source] = {}
        self.hf_names: dict[str, str] = {}  # demo name -> HF name (HF layout only)
        self.hf: dict[str, tuple[Path, TensorInfo]] = {}  # HF name -> (shard, info) (HF layout only)
        self.unknown: list[str] = []
        self.mp: int | None = None
        rank_files = sorted(p for p in self.path.glob("*.safetensors") if RANK_FILE.match(p.name))
        if (self.path / INDEX).is_file():
            self.layout = "hf"
            self._read_hf_index()
        elif (self.path / SINGLE).is_file():
            self.layout = "hf"
            self._add_hf_file(self.path / SINGLE, None)
        elif rank_files:
            self.layout = "mp"
            self._read_rank_files(rank_files)
        else:
            raise CheckpointError(
                f"{self.path}: not a checkpoint: no {INDEX}, {SINGLE} or model{{rank}}-mp{{N}}.safetensors; "
                "point at the directory holding the weights"
            )

    @property
    def files(self) -> list[Path]:
        """Every weight file the checkpoint consists of, sorted."""
        return sorted({p for src in self.sources.values() for p, _, _ in src.parts} | {p for p, _ in self.hf.values()})

    # ---- discovery ------------------------------------------------------------------------------
    def _read_hf_index(self) -> None:
        index_path = self.path / INDEX
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: unreadable index (not JSON with a weight_map); re-download it") from None
        except OSError as e:
            raise CheckpointError(f"{index_path}: cannot read ({e.strerror})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: weight_map is a {type(weight_map).__name__}, expected an object")
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not _confined(fname):
                self.problems.add(f"{index_path}: {name} points at {fname!r}, which is not a file name inside the "
                                  "checkpoint directory; re-download the index")
                continue
            by_file.setdefault(fname, []).append(name)
        for fname, tensor_names in sorted(by_file.items()):
            path = self.path / fname
            if not path.is_file():
                self.problems.add(
                    f"{path}: missing shard ({len(tensor_names)} tensors, e.g. {tensor_names[0]}, live there "
                    f"according to {INDEX}); re-download it"
                )
                continue
            self._add_hf_file(path, tensor_names)

    def _add_hf_file(self, path: Path, expect: list[str] | None) -> None:
        try:
            infos, _ = read_header(path)
        except CheckpointError as e:
            self.problems.add(str(e))
            return
        if expect is not None:
            absent = [n for n in expect if n not in infos]
            if absent:
                self.problems.add(f"{path}: {INDEX} lists {absent[0]} in this shard but it is not there "
                                  f"({len(absent)} such); the shard and index disagree, re-download them")
            listed = set(expect)
            unlisted = [n for n in infos if n not in listed]
            if unlisted:
                self.problems.add(f"{path}: holds {unlisted[0]}, which {INDEX} does not list there "
                                  f"({len(unlisted)} such); the shard and index disagree, re-download them")
        for name in expect if expect is not None else infos:
            if name not in infos:
                continue
            self.hf[name] = (path, infos[name])
            try:
                demo = N.hf_to_demo(name)
            except N.UnknownTensor:
                self.unknown.append(name)
                continue
            self.sources[demo] = Source([(path, name, infos[name])])
            self.hf_names[demo] = name

    def _read_rank_files(self, files: list[Path]) -> None:
        sizes = {int(RANK_FILE.match(p.name).group(3)) for p in files}
        if len(sizes) != 1:
            raise CheckpointError(f"{self.path}: rank files for several model-parallel sizes {sorted(sizes)}; keep one set")
        self.mp = sizes.pop()
        ranks = {(RANK_FILE.match(p.name).group(1), int(RANK_FILE.match(p.name).group(2))) for p in files}
        for kind, r in sorted(ranks):
            if r >= self.mp:
                self.problems.add(f"{self.path}: {kind}{r}-mp{self.mp}.safetensors has a rank >= {self.mp}; remove it")
        for r in range(self.mp):
            if ("model", r) not in ranks:
                self.problems.add(f"{self.path}: model{r}-mp{self.mp}.safetensors is missing; re-run the reshard")
        for p in files:
            try:
                infos, _ = read_header(p)
            except CheckpointError as e:
                self.problems.add(str(e))
                continue
            for name, info in infos.items():
                self.sources.setdefault(name, Source()).parts.append((p, name, info))
        for demo, src in self.sources.items():  # rank order, for concatenation
            src.parts.sort(key=lambda part: int(RANK_FILE.match(part[0].name).group(2)))
            first = src.parts[0][2]
            for p, _, info in src.parts[1:]:
                if info.dtype != first.dtype or len(info.shape) != len(first.shape):
                    self.problems.add(f"{p}: {demo} is {info.dtype} {list(info.shape)} here but {first.dtype} "
                                      f"{list(first.shape)} in {src.parts[0][0].name}; re-run the reshard")

    # ---- reading --------------------------------------------------------------------------------
    def read_part(self, path: Path, info: TensorInfo) -> torch.Tensor:
        """One stored tensor, values checked, through a handle kept open per file (an open per tensor
        costs more than reading a small one). With `mapped` (conversions), the tensor is a view of a
        private memory map instead of a copy: data goes from the page cache to the writer or the
        dequant kernel without a read copy. The loader keeps copies: a model must not share pages
        with files that may change under it."""
        if path not in self._handles:
            try:
                with open(path, "rb") as f:
                    self._handles[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.mapped \
                        else open(path, "rb")
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        if self.mapped:
            return read_mapped(path, info, self._handles[path])
        return read_tensor(path, info, f=self._handles[path])

    def release(self, path: Path) -> None:
        """Close one file's handle (unmapping it: its pages leave this process's RSS)."""
        f = self._handles.pop(path, None)
        if f is not None:
            try:
                f.close()
            except BufferError:  # a tensor still views the map: it goes when the tensor does
                pass

    def close(self) -> None:
        for f in self._handles.values():
            try:
                f.close()
            except BufferError:  # a tensor still views the map: it goes when the tensor does
                pass
        self._handles.clear()

    def __del__(self):
        self.close()

    # ---- queries --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.sources)

    def info(self, demo: str) -> TensorInfo:
        """dtype and full (unsplit) shape."""
        parts = self.sources[demo].parts
        first = parts[0][2]
        dim = N.split_dim(demo)
        if len(parts) == 1 or dim is None:
            return first
        shape = list(first.shape)
        shape[dim] = sum(p[2].shape[dim] for p in parts)
        return TensorInfo(first.dtype, tuple(shape), 0, 0, demo)

    def display(self, demo: str) -> str:
        return self.hf_names.get(demo, demo)

    def read(self, demo: str, par: Parallel) -> torch.Tensor:
        """This rank's slice of a tensor (the whole tensor when it is replicated or par is single)."""
        src = self.sources[demo].parts
        dim = N.split_dim(demo)
        if self.layout == "mp" and len(src) > 1 and dim is not None:
            if par.world_size == len(src):
                path, name, info = src[par.rank]
                return self.read_part(path, info)
            full = torch.cat([self.read_part(p, i) for p, _, i in src], dim=dim)
            return slice_rank(full, dim, par.rank, par.world_size)
        path, name, info = src[0]
        if dim is None or par.world_size == 1 or (self.layout == "mp" and par.world_size == self.mp):
            return self.read_part(path, info)
        if dim == 0:  # only this rank's rows leave the disk
            n = info.shape[0] // par.world_size
            row = info.nbytes // info.shape[0] if info.shape[0] else 0
            part = TensorInfo(info.dtype, (n, *info.shape[1:]), info.begin + par.rank * n * row,
                              info.begin + (par.rank + 1) * n * row, info.name)
            return self.read_part(path, part)
        return slice_rank(self.read_part(path, info), dim, par.rank, par.world_size)


    @property
    def fp8(self) -> bool:
        return any(is_fp8(self.info(n).dtype) for n in self.names())


def slice_rank(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n).clone()


def _confined(fname: str) -> bool:
    """A relative path that stays inside the checkpoint directory (symlinked blobs, as in a hub
    cache, are fine: only the name is judged)."""
    p = PurePosixPath(fname)
    return bool(fname) and "\\" not in fname and not p.is_absolute() and ".." not in p.parts and p.suffix == ".safetensors"


# ---- the validator --------------------------------------------------------------------------------
def validate(ckpt: Checkpoint, cfg: ModelConfig) -> bool:
    """Every tensor the config implies exists with its shape and a dtype fit for its role, and nothing
    unexpected does. Problems go to the checkpoint's Problems. Returns whether the MTP layer is there."""
    add = ckpt.problems.add
    if ckpt.unknown:
        add(f"{ckpt.path}: unexpected tensor {ckpt.unknown[0]} ({len(ckpt.unknown)} unknown names); "
            "this is not a DeepSeek-V3 checkpoint or it was written by an unknown tool")
    fp8 = ckpt.fp8
    full = {N.hf_to_demo(n): spec for n, spec in N.expected_hf_tensors(cfg, fp8=fp8).items()}
    main = {N.hf_to_demo(n): spec for n, spec in N.expected_hf_tensors(cfg, fp8=fp8, with_mtp=False).items()}
    have = set(ckpt.names())
    mtp_names = [n for n in full if n not in main]
    has_mtp = cfg.num_nextn_predict_layers > 0 and all(n in have for n in mtp_names)
    # MTP absent altogether is allowed (the official demo drops it); half of it is not
    expected = full if has_mtp or any(n in have for n in mtp_names) else main
    for name, spec in expected.items():
        if name not in have:
            what = "scale" if spec.role == "scale" else "tensor"
            add(f"{ckpt.path}: missing {what} {N.demo_to_hf(name)}; the checkpoint is incomplete or does not "
                "match config.json")
            continue
        info = ckpt.info(name)
        if tuple(info.shape) != spec.shape:
            add(f"{ckpt.path}: tensor {N.demo_to_hf(name)} has shape {list(info.shape)}, config.json implies "
                f"{list(spec.shape)}; the config does not belong to these weights")
        ok = _dtypes_for(spec.role, fp8)
        if info.dtype not in ok:
            add(f"{ckpt.path}: tensor {N.demo_to_hf(name)} is {info.dtype}, expected "
                f"{' or '.join(str(d).removeprefix('torch.') for d in ok)} for a {spec.role} tensor")
    extra = sorted(have - set(full))
    if extra:
        add(f"{ckpt.path}: unexpected tensor {N.demo_to_hf(extra[0])} ({len(extra)} such) for this config.json")
    return has_mtp


def _dtypes_for(role: str, fp8: bool) -> tuple[torch.dtype, ...]:
    if role == "scale":
        return (torch.float32,)
    if role == "linear" and fp8:
        return FP8_DTYPES
    return FLOAT_DTYPES
