"""Rank/world context and the collectives the model uses.

No module globals: a `Parallel` object is built once (from torchrun's environment or by hand)
and passed to the model. With world_size == 1 every collective is a no-op, so the single-process
path has no torch.distributed dependency at all.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DsvError


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Parallel":
        """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (absent: one process)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise DsvError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); launch with torchrun") from None
        if not 0 <= rank < world:
            raise DsvError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}; check the launch command")
        return cls(rank=rank, world_size=world, local_rank=local)

    def split(self, n: int, what: str) -> int:
        """The size of this rank's share of a dimension of size n."""
        if n % self.world_size:
            ok = [d for d in range(1, n + 1) if n % d == 0]
            raise DsvError(
                f"{what}={n} is not divisible by the world size {self.world_size}; "
                f"use a number of processes in {ok[:12]}"
            )
        return n // self.world_size

    # ---- collectives (no-ops for one process) --------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dim (vocab-parallel head)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(x, src)
        return x

    def broadcast_object(self, obj, src: int = 0):
        """Rank src's Python object on every rank (prompts, stdin lines)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src)
        return box[0]

    # ---- process group ------------------------------------------------------------------------
    def init(self, backend: str, timeout_s: float = 120.0) -> None:
        """Join the process group torchrun described (MASTER_ADDR/MASTER_PORT from the environment)."""
        if self.world_size == 1 or dist.is_initialized():
            return
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DsvError(f"WORLD_SIZE={self.world_size} but {var} is not set; launch with torchrun "
                               "(it sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s))
        # an undestroyed gloo group aborts the interpreter at exit ("terminate called ...")
        atexit.register(_destroy)

    def check_same(self, what: str, payload: bytes) -> None:
        """Fail on every rank if the ranks were started with different inputs (e.g. checkpoints)."""
        if self.world_size == 1:
            return
        digest = hashlib.sha256(payload).hexdigest()[:16]
        digests = [None] * self.world_size
        dist.all_gather_object(digests, digest)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise DsvError(f"rank {odd[0]} was started with a different {what} than rank 0 "
                           f"({digests[odd[0]]} != {digests[0]}); start every rank with the same checkpoint and flags")


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


