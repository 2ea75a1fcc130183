"""Shared fixtures: tiny random checkpoints in the released FP8 layout, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter. Triton reads this when
# a kernel is decorated, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_configs import CONFIGS

from dsv3.synthetic import DEMO, write_checkpoint


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("demo"), DEMO, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    """One released-format checkpoint per tiny config (see tiny_configs.py)."""
    return {name: write_checkpoint(tmp_path_factory.mktemp(name), cfg, seed=i + 1, n_shards=3)
            for i, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="session")
def hf_refs(tiny_ckpts, tmp_path_factory) -> dict[str, Path]:
    from reference import write_hf_reference

    return {name: write_hf_reference(path, tmp_path_factory.mktemp(name + "_ref")) for name, path in tiny_ckpts.items()}
