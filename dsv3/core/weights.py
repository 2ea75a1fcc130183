"""Reading checkpoints: index, shards, names, FP8 block scales, per-rank slicing.

Three layouts are accepted (see DESIGN.md): the released HF layout in FP8, the same in BF16,
and the official demo's model-parallel rank files `model{r}-mp{N}.safetensors` (MTP in
`mtp{r}-mp{N}.safetensors`). Every layout is seen through one view: demo name -> this rank's
slice, read lazily tensor by tensor, so the checkpoint is never held twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import names as N
from .config import ModelConfig
from .errors import CheckpointError
from .fp8 import BLOCK, dequantize, is_fp8
from .parallel import Parallel
from .safetensors_io import TensorInfo, read_header, read_rows, read_tensor

INDEX = "model.safetensors.index.json"
RANK_FILE = re.compile(r"^(model|mtp)(\d+)-mp(\d+)\.safetensors$")


@dataclass
class Source:
    """Where one demo-named tensor lives: one entry per part (one for HF, N for split rank files)."""

    parts: list[tuple[Path, str, TensorInfo]] = field(default_factory=list)


class Checkpoint:
    """A checkpoint directory seen as demo names -> sources, with headers read up front."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such directory; pass a checkpoint directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory; pass the checkpoint directory, not a file")
        self.sources: dict[str, Source] = {}
        self.hf_names: dict[str, str] = {}  # demo name -> HF name (HF layout only)
        self.unknown: list[str] = []
        self.mp: int | None = None
        rank_files = sorted(p for p in self.path.glob("*.safetensors") if RANK_FILE.match(p.name))
        if (self.path / INDEX).is_file():
            self.layout = "hf"
            self._read_hf_index()
        elif (self.path / "model.safetensors").is_file():
            self.layout = "hf"
            self._add_hf_file(self.path / "model.safetensors", None)
        elif rank_files:
            self.layout = "mp"
            self._read_rank_files(rank_files)
        else:
            raise CheckpointError(
                f"{self.path}: not a checkpoint: no {INDEX}, model.safetensors or model{{rank}}-mp{{N}}.safetensors; "
                "point at the directory holding the weights"
            )

    # ---- discovery ------------------------------------------------------------------------------
    def _read_hf_index(self) -> None:
        index_path = self.path / INDEX
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: unreadable index (no weight_map); re-download it") from None
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        for fname, tensor_names in sorted(by_file.items()):
            path = self.path / fname
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: missing shard ({len(tensor_names)} tensors, e.g. {tensor_names[0]}, live there "
                    f"according to {INDEX}); re-download it"
                )
            self._add_hf_file(path, tensor_names)

    def _add_hf_file(self, path: Path, expect: list[str] | None) -> None:
        infos, _ = read_header(path)
        if expect is not None:
            absent = [n for n in expect if n not in infos]
            if absent:
                raise CheckpointError(
                    f"{path}: {INDEX} lists {absent[0]} in this shard but it is not there "
                    f"({len(absent)} such); the shard and index disagree, re-download them"
                )
        for name in expect if expect is not None else infos:
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
        for r in range(self.mp):
            if ("model", r) not in ranks:
                raise CheckpointError(f"{self.path}: model{r}-mp{self.mp}.safetensors is missing; re-run the reshard")
        for p in files:
            infos, _ = read_header(p)
            for name, info in infos.items():
                self.sources.setdefault(name, Source()).parts.append((p, name, info))
        for src in self.sources.values():  # rank order, for concatenation
            src.parts.sort(key=lambda part: int(RANK_FILE.match(part[0].name).group(2)))

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
        return TensorInfo(first.dtype, tuple(shape), 0, 0)

    def display(self, demo: str) -> str:
        return self.hf_names.get(demo, demo)

    def read(self, demo: str, par: Parallel) -> torch.Tensor:
        """This rank's slice of a tensor (the whole tensor when it is replicated or par is single)."""
        src = self.sources[demo].parts
        dim = N.split_dim(demo)
        if self.layout == "mp" and len(src) > 1 and dim is not None:
            if par.world_size == len(src):
                path, name, info = src[par.rank]
                return read_tensor(path, info)
            full = torch.cat([read_tensor(p, i) for p, _, i in src], dim=dim)
            return _slice(full, dim, par.rank, par.world_size)
        path, name, info = src[0]
        if dim is None or par.world_size == 1 or (self.layout == "mp" and par.world_size == self.mp):
            return read_tensor(path, info)
        if dim == 0:  # only this rank's rows leave the disk
            n = info.shape[0] // par.world_size
            return read_rows(path, info, par.rank * n, (par.rank + 1) * n)
        return _slice(read_tensor(path, info), dim, par.rank, par.world_size)


def _slice(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n).clone()


# ---- loading into the model ---------------------------------------------------------------------------
def check_names(ckpt: Checkpoint, cfg: ModelConfig) -> bool:
    """Strict: every tensor the config implies exists and nothing unexpected does. Returns has_mtp."""
    if ckpt.unknown:
        raise CheckpointError(
            f"{ckpt.path}: unexpected tensor {ckpt.unknown[0]} ({len(ckpt.unknown)} unknown names); "
            "this is not a DeepSeek-V3 checkpoint or it was written by an unknown tool"
        )
    fp8 = any(is_fp8(ckpt.info(n).dtype) for n in ckpt.names())
    full = {N.hf_to_demo(n): spec for n, spec in N.expected_hf_tensors(cfg, fp8=fp8).items()}
    main = {N.hf_to_demo(n): spec for n, spec in N.expected_hf_tensors(cfg, fp8=fp8, with_mtp=False).items()}
    have = set(ckpt.names())
    missing_mtp = [n for n in full if n not in main and n not in have]
    has_mtp = cfg.num_nextn_predict_layers > 0 and not missing_mtp
    expected = full if has_mtp else main
    for name, spec in expected.items():
        if name not in have:
            what = "scale" if spec.role == "scale" else "tensor"
            raise CheckpointError(
                f"{ckpt.path}: missing {what} {N.demo_to_hf(name)}; the checkpoint is incomplete or does not "
                "match config.json"
            )
        info = ckpt.info(name)
        if tuple(info.shape) != spec.shape:
            raise CheckpointError(
                f"{ckpt.path}: tensor {N.demo_to_hf(name)} has shape {list(info.shape)}, config.json implies "
                f"{list(spec.shape)}; the config does not belong to these weights"
            )
    extra = sorted(have - set(full))
    if extra:
        raise CheckpointError(f"{ckpt.path}: unexpected tensor {N.demo_to_hf(extra[0])} ({len(extra)} such) for this config.json")
    return has_mtp


def load_weights(model, ckpt: Checkpoint, cfg: ModelConfig, kernels, dtype: torch.dtype, par: Parallel,
                 progress=None) -> None:
    """Fill the model's meta buffers tensor by tensor; the cpu backend dequantizes FP8 as it goes."""
    buffers = dict(model.named_buffers())
    n_layers = cfg.num_hidden_layers
    for demo in [n for n in ckpt.names() if not n.endswith(".scale")]:  # scales travel with their weight
        target = N.demo_to_model(demo, n_layers)
        if progress is not None:
            progress(ckpt.info(demo).nbytes)
        if target is None:
            continue
        ours, expert = target
        if ours not in buffers:
            if ours.startswith("mtp.") and not len(model.mtp):
                continue
            raise CheckpointError(f"{ckpt.path}: tensor {ckpt.display(demo)} has no place in the model")
        owner = _owner(model, ours)
        if expert is not None and not owner.first <= expert < owner.first + owner.count:
            continue  # another rank's expert
        weight, scale = _read_weight(ckpt, demo, par, kernels, whole=expert is not None)
        leaf = ours.rsplit(".", 1)[1]
        kind = type(owner).__name__
        if kind in ("Linear", "StackedLinear") and leaf == "weight":
            w, s = kernels.prepare_linear(weight, scale, dtype)
        elif kind == "Gate":  # routing stays fp32: near-ties decide which experts run
            w, s = weight.float().to(kernels.device), None
        else:
            w, s = weight.to(dtype).to(kernels.device), None
        _assign(owner, leaf, w, expert, ours)
        if s is not None:
            _assign(owner, "scale", s, expert, ours)
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    for name, buf in model.named_buffers():
        if buf is not None and buf.device.type == "meta":
            raise CheckpointError(f"{ckpt.path}: nothing in the checkpoint fills {name}; it does not match config.json")


def _read_weight(ckpt: Checkpoint, demo: str, par: Parallel, kernels, whole: bool):
    """This rank's (weight, fp32 scale or None). Splits that cut through 128x128 scale blocks
    cannot slice the scale, so for backends that dequantize at load the full weight is
    dequantized first and then sliced; FP8-keeping backends get a precise error."""
    info = ckpt.info(demo)
    scale_name = demo[: -len("weight")] + "scale"
    if not is_fp8(info.dtype):
        return ckpt.read(demo, par), None
    if scale_name not in ckpt.sources:
        raise CheckpointError(f"{ckpt.path}: FP8 weight {ckpt.display(demo)} has no scale {ckpt.display(scale_name)}")
    dim = N.split_dim(demo)
    aligned = (whole or dim is None or par.world_size == 1 or (ckpt.layout == "mp" and ckpt.mp == par.world_size)
               or (info.shape[dim] // par.world_size) % BLOCK == 0)
    if aligned:
        return ckpt.read(demo, par), ckpt.read(scale_name, par).float()
    if kernels.fp8_dtype is not None:
        ok = [w for w in range(1, info.shape[dim] + 1) if info.shape[dim] % w == 0 and (info.shape[dim] // w) % BLOCK == 0]
        raise CheckpointError(
            f"{ckpt.display(demo)}: splitting dim {dim} of size {info.shape[dim]} over {par.world_size} ranks cuts "
            f"through 128x128 scale blocks; use a world size in {ok} or a backend that dequantizes at load"
        )
    dense = dequantize(ckpt.read(demo, Parallel()), ckpt.read(scale_name, Parallel()).float(), torch.float32)
    return _slice(dense, dim, par.rank, par.world_size), None


def _owner(model, name: str):
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
    return module


def _assign(owner, leaf: str, value: torch.Tensor, expert: int | None, name: str) -> None:
    current = owner._buffers.get(leaf)
    if expert is None:
        if current is not None and current.device.type == "meta" and leaf == "weight" and current.shape != value.shape:
            raise CheckpointError(f"{name}: loaded shape {list(value.shape)} != model shape {list(current.shape)}")
        owner._buffers[leaf] = value
        return
    if current is None or current.device.type == "meta":
        current = torch.empty((owner.count, *value.shape), dtype=value.dtype, device=value.device)
        owner._buffers[leaf] = current
    current[expert - owner.first].copy_(value)
