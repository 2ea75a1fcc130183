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

# pytest-xdist runs the suite in one process per core (pyproject's addopts): each gets its share of the cores, since
# torch's and the C kernels' OpenMP threads on a core another worker is busy on spin and wait (several times slower).
# The processes the tests start (servers, torchrun ranks) take theirs from OMP_NUM_THREADS.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)

sys.path.insert(0, str(Path(__file__).parent))

import triton_interpreter  # noqa: E402

triton_interpreter.install()

from tiny_configs import CONFIGS

from dsv3.synthetic import DEMO, write_checkpoint


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory) -> None:
    """The processes the tests start put their temporary files under this session's directory, which pytest prunes:
    torchrun leaves a torchelastic_* log directory behind in the system's temp dir per run otherwise."""
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess-tmp"))


def pytest_collection_modifyitems(items) -> None:
    """Tests marked slow (a minute or more on 2 cores) run first: handed out last, one of them kept a worker busy
    for a minute after the other had run out of tests."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order


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
