"""Tensor parallelism under torchrun on gloo equals one process (fp32)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_configs import ALIGNED

from dsv3.cli import main
from dsv3.synthetic import write_checkpoint

WORKER = str(Path(__file__).parent / "tp_worker.py")


def torchrun(*args, timeout=240, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def single(ckpt, out):
    r = subprocess.run([sys.executable, WORKER, str(ckpt), str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tp_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tp"), ALIGNED, seed=6, n_shards=3)


@pytest.fixture(scope="module")
def reference(tp_ckpt, tmp_path_factory):
    return single(tp_ckpt, tmp_path_factory.mktemp("ref") / "ref.pt")


def check(got, ref, world):
    assert got["world"] == world
    assert rel(got["logits"], ref["logits"]) <= 1e-5, rel(got["logits"], ref["logits"])
    assert got["tokens"] == ref["tokens"]
    if ref["mtp"] is not None:
        assert rel(got["mtp"], ref["mtp"]) <= 1e-5


@pytest.mark.parametrize("n", [2, 4])
def test_tp_from_hf_fp8_layout_equals_single_process(n, tp_ckpt, reference, tmp_path):
    out = tmp_path / "tp.pt"
    r = torchrun("--standalone", "--nproc-per-node", n, WORKER, tp_ckpt, out)
    assert r.returncode == 0, r.stderr[-3000:]
    check(torch.load(out), reference, n)


def test_tp_from_rank_files_equals_single_process(tp_ckpt, reference, tmp_path):
    rank_dir = tmp_path / "mp2"
    r = CliRunner().invoke(main, ["convert", "reshard", str(tp_ckpt), str(rank_dir), "--model-parallel", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "tp.pt"
    r = torchrun("--standalone", "--nproc-per-node", 2, WORKER, rank_dir, out)
    assert r.returncode == 0, r.stderr[-3000:]
    check(torch.load(out), reference, 2)
    r = torchrun("--standalone", "--nproc-per-node", 4, WORKER, rank_dir, out)
    assert r.returncode != 0 and "rank files are for --model-parallel 2 but 4 processes" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_procedure_on_loopback(tp_ckpt, reference, tmp_path):
    port = free_port()
    out = tmp_path / "two_nodes.pt"
    common = ["--nnodes", 2, "--nproc-per-node", 1, "--master-addr", "127.0.0.1", "--master-port", port]
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    procs = [subprocess.Popen([*cmd, *map(str, common), "--node-rank", str(r), WORKER, str(tp_ckpt), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    check(torch.load(out), reference, 2)


def test_a_dead_rank_ends_the_job(tp_ckpt, tmp_path):
    t0 = time.time()
    import os
    r = torchrun("--standalone", "--nproc-per-node", 2, WORKER, tp_ckpt, tmp_path / "x.pt",
                 env={**os.environ, "TP_TEST_KILL_RANK": "1"}, timeout=120)
    assert r.returncode != 0
    assert time.time() - t0 < 60 + 30  # the 60 s bound, plus interpreter and load time


def test_mismatched_checkpoints_are_detected(tp_ckpt, tmp_path):
    """Rank 1 sees a different config.json: every rank stops with a message naming the mismatch."""
    import os
    other = write_checkpoint(tmp_path / "other", {**ALIGNED, "rms_norm_eps": 1e-5}, seed=6, n_shards=3)
    script = tmp_path / "w.py"
    script.write_text(f"import os, dsv3\n"
                      f"p = {str(tp_ckpt)!r} if os.environ['RANK'] == '0' else {str(other)!r}\n"
                      f"dsv3.load(p, backend='cpu', dtype='fp32')\n")
    r = torchrun("--standalone", "--nproc-per-node", 2, script, env=dict(os.environ))
    assert r.returncode != 0 and "was started with a different checkpoint" in r.stderr


def test_cli_under_torchrun_reports_memory_per_rank(demo_ckpt, tmp_path):
    r = torchrun("--standalone", "--nproc-per-node", 2, "-m", "dsv3", "--verbose", "run", demo_ckpt, "--prompt",
                 "Hello", "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr and "rank 1/2" in r.stderr and "resident weights" in r.stderr
    assert r.stderr.count("prefill:") == 1  # only rank 0 prints


def test_speculative_decoding_under_tensor_parallel(tp_ckpt, tmp_path):
    """MTP drafting on 2 ranks: greedy tokens are plain decoding's (drafting held on, drafts as the random MTP layer
    makes them, or perfect, k = 1 and 2, and adaptive), and a sampled run's draws and acceptances are rank 0's: with
    rank 0 seeded as one process and the other rank seeded otherwise, every rank gives that process's tokens."""
    worker = str(Path(__file__).parent / "tp_spec_worker.py")
    r = subprocess.run([sys.executable, worker, str(tp_ckpt), str(tmp_path / "one")], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun("--standalone", "--nproc-per-node", 2, worker, tp_ckpt, tmp_path / "tp")
    assert r.returncode == 0, r.stderr[-3000:]
    one, ranks = torch.load(tmp_path / "one.0"), [torch.load(tmp_path / f"tp.{i}") for i in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0] == {**ranks[1], "world": 2}
    for got in (one, ranks[0]):
        for key in ("greedy-k1", "greedy-k2", "adaptive", "perfect"):
            assert got[key] == got["plain"], key
        assert got["perfect-accepted"] > 0.8
    assert ranks[0]["sampled"] == one["sampled"] and ranks[0]["plain"] == one["plain"]
