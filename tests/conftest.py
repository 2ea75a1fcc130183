"""Shared fixtures: tiny random checkpoints in the released FP8 layout, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dsv3.demo import DEMO, write_checkpoint  # noqa: E402

from tiny_configs import CONFIGS  # noqa: E402


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
