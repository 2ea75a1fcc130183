"""Launch configurations per vendor, and facts about the FP8 formats the kernels are built for.

Pure Python (no triton import): the backends read these tables to describe themselves. Every
kernel file takes a `target` ("nvidia" or "amd") and looks its block sizes up here, so the
ROCm backend runs the same kernel source with wave64-appropriate settings instead of a copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

TARGETS = ("nvidia", "amd")
#: up to this many rows a linear quantizes its activation inside the FP8 GEMM (one launch); above, each
#: N tile would redo the quantization of every row, so act_quant runs once first
FUSED_QUANT_ROWS = 64


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# (largest M of the bucket, config). BLOCK_K is always 128: one activation scale and one weight
# scale per K step. Buckets keep the compile count at four per kernel, whatever M arrives.
_GEMM = {
    "nvidia": ((16, GemmConfig(16, 64, 4, 4)), (32, GemmConfig(32, 64, 4, 4)), (64, GemmConfig(64, 128, 4, 3)),
               (1 << 62, GemmConfig(128, 128, 8, 3))),
    # wave64: 4 warps already fill 256 lanes. LDS is 64 KB per CU on MI300: two stages of a 128x128
    # FP8 A tile and a 128x128 B tile would need all of it, so the largest tile is 128x64
    "amd": ((16, GemmConfig(16, 64, 4, 2)), (32, GemmConfig(32, 64, 4, 2)), (64, GemmConfig(64, 128, 4, 2)),
            (1 << 62, GemmConfig(128, 64, 8, 2))),
}


def gemm_config(m: int, target: str) -> GemmConfig:
    for bound, cfg in _GEMM[target]:
        if m <= bound:
            return cfg
    raise AssertionError("unreachable: the last bucket is unbounded")


def moe_config(rows_per_expert: float, target: str) -> GemmConfig:
    """Grouped GEMM tiles: rows of one expert share a tile, so the tile height follows their mean count."""
    return gemm_config(int(rows_per_expert), target)


@dataclass(frozen=True)
class AttnConfig:
    block_h: int
    block_t: int
    num_warps: int
    num_stages: int


# a [BLOCK_T, 512] bf16 latent tile is 64 KB at BLOCK_T = 64: fine twice in an H100's 228 KB of shared
# memory, the whole of an MI300 CU's LDS, so AMD reads 32 keys per step
_ATTN = {"nvidia": AttnConfig(16, 64, 4, 2), "amd": AttnConfig(16, 32, 4, 1)}


def attn_config(target: str) -> AttnConfig:
    return _ATTN[target]


def interpreted(device: torch.device) -> bool:
    """True when kernels run on CPU tensors under Triton's interpreter."""
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
