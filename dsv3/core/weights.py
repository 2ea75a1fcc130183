"""Loading a checkpoint into the model: each tensor read once, sliced for this rank, prepared by the
backend (FP8 kept, converted or dequantized) and placed. Reading and validating the files is
`core/checkpoint.py`'s job."""

from __future__ import annotations

import torch

from . import names as N
from .checkpoint import Checkpoint, slice_rank
from .config import ModelConfig
from .errors import CheckpointError
from .fp8 import BLOCK, dequantize, is_fp8
from .model import Gate, Linear, StackedLinear
from .parallel import Parallel


def load_weights(model, ckpt: Checkpoint, cfg: ModelConfig, kernels, dtype: torch.dtype, par: Parallel,
                 progress=None) -> None:
    """Fill the model's meta buffers tensor by tensor; the cpu backend dequantizes FP8 as it goes."""
    buffers = dict(model.named_buffers())
    n_layers = cfg.num_hidden_layers
    todo = [n for n in ckpt.names() if not n.endswith(".scale")]  # scales travel with their weight
    total = sum(ckpt.info(n).nbytes for n in todo)
    for demo in todo:
        target = N.demo_to_model(demo, n_layers)
        if progress is not None:
            progress(ckpt.info(demo).nbytes, total)
        if target is None:
            continue
        ours, expert = target
        if ours not in buffers:
            if ours.startswith("mtp.") and not len(model.mtp):
                continue
            raise CheckpointError(f"{ckpt.path}: tensor {ckpt.display(demo)} has no place in the model")
        owner = model.get_submodule(ours.rsplit(".", 1)[0])
        if expert is not None and not owner.first <= expert < owner.first + owner.count:
            continue  # another rank's expert
        weight, scale = _read_weight(ckpt, demo, par, kernels, whole=expert is not None)
        leaf = ours.rsplit(".", 1)[1]
        if isinstance(owner, (Linear, StackedLinear)) and leaf == "weight":
            w, s = kernels.prepare_linear(weight, scale, dtype)
        elif isinstance(owner, Gate):  # routing stays fp32: near-ties decide which experts run
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
    cannot slice the scale, so for backends that dequantize at load (or may, for such a weight) the full
    weight is dequantized first and then sliced; other FP8-keeping backends get a precise error."""
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
    if kernels.fp8_dtype is not None and not kernels.fp8_split_dequantizes:
        ok = [w for w in range(1, info.shape[dim] + 1) if info.shape[dim] % w == 0 and (info.shape[dim] // w) % BLOCK == 0]
        raise CheckpointError(
            f"{ckpt.display(demo)}: splitting dim {dim} of size {info.shape[dim]} over {par.world_size} ranks cuts "
            f"through 128x128 scale blocks; use a world size in {ok} or a backend that dequantizes at load"
        )
    dense = dequantize(ckpt.read(demo, Parallel()), ckpt.read(scale_name, Parallel()).float(), torch.float32)
    return slice_rank(dense, dim, par.rank, par.world_size), None


def _assign(owner, leaf: str, value: torch.Tensor, expert: int | None, name: str) -> None:
    """Set a buffer (a registered name, so setattr replaces it), or one expert's slice of a stacked one."""
    current = getattr(owner, leaf)
    if expert is None:
        if current is not None and current.device.type == "meta" and leaf == "weight" and current.shape != value.shape:
            raise CheckpointError(f"{name}: loaded shape {list(value.shape)} != model shape {list(current.shape)}")
        setattr(owner, leaf, value)
        return
    if current is None or current.device.type == "meta":
        current = torch.empty((owner.count, *value.shape), dtype=value.dtype, device=value.device)
        setattr(owner, leaf, current)
    current[expert - owner.first].copy_(value)
