"""What the benchmarks share: the common flags, the 280M checkpoint, and writing RESULTS.md sections."""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import re
import shutil
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the command it names; rerun it to refresh.\n"


def append_section(title: str, command: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.is_file() else HEADER
    stamp = datetime.date.today().isoformat()
    section = f"## {title}\n\nCommand: `{command}` ({stamp})\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="reuse the checkpoint(s) written here")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    return ap


def synthetic_checkpoint(path: Path, config: dict, n_shards: int) -> Path:
    """A random checkpoint of `config` in the released FP8 layout at path, written unless one of this config is
    already there (a --workdir kept from a run with another config is rewritten, not measured by mistake)."""
    import json

    from dsv3.synthetic import write_checkpoint

    try:
        written = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        written = None
    if written is None or any(written.get(key) != value for key, value in config.items()):
        write_checkpoint(path, config, seed=0, n_shards=n_shards, tokenizer=False)
    return path


def bench_checkpoint(workdir: Path | None, prefix: str) -> tuple[Path, Path]:
    """(work dir, the ~280M-parameter checkpoint in the released FP8 layout, 8 shards), written once. Without a
    --workdir the checkpoint goes to a temporary directory removed when the process ends (1.2 GB with the
    benchmarks' conversions: left behind, every run would add that much to /tmp)."""
    from dsv3.synthetic import BENCH_280M

    work = workdir
    if work is None:
        work = Path(tempfile.mkdtemp(prefix=prefix))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work, synthetic_checkpoint(work / "fp8", BENCH_280M, n_shards=8)


def perfect_drafts(engine, prompt: list[int], new_tokens: int, rounds: int = 8, k: int = 1,
                   plain: dict | None = None):
    """A drafter (for dsv3.core.speculative) that always proposes the run's own next k tokens, for batch 1.
    In bf16 a verify step of 1 + k tokens may break a near-tie differently from a plain step, so the plain answer is
    only the start: rerun with the last answer as the drafts until it no longer changes (a fixed point), at most
    `rounds` times (a smoke run under the interpreter checks the path, not the acceptance: 0). `plain`, if given,
    keeps the plain answer per (prompt, new_tokens) for the next call on the same engine (each k starts from it)."""
    import torch

    from dsv3.core.speculative import speculative_generate

    key, plain = (tuple(prompt), new_tokens), {} if plain is None else plain
    if key not in plain:
        plain[key] = engine.generate([prompt], max_new_tokens=new_tokens)[0]
    answer = list(plain[key])

    def drafter(rows, length, out):
        return torch.tensor([(answer + [0] * (k + 1))[len(out[0]):len(out[0]) + k]])

    for _ in range(rounds):
        again, _ = speculative_generate(engine.model, [prompt], new_tokens, k, eos_ids=tuple(engine.cfg.eos_token_ids),
                                        drafter=drafter, adaptive=False)
        if again[0] == answer:
            break
        answer = again[0]
    return drafter


def nbytes(module) -> int:
    """Bytes of a module's buffers (its weights)."""
    return sum(b.numel() * b.element_size() for b in module.buffers() if b is not None)


def fixed_step_bytes(block) -> float:
    """Weight bytes a decoder block reads at every step whatever the routing: attention (the absorbed projections
    where they were made, in place of wkv_b, which decoding then never reads), norms, the gate and the dense or
    shared MLP; its routed experts left out."""
    from dsv3.core.model import MoE

    total = nbytes(block)
    absorbed = block.attn._absorbed
    if absorbed is not None:
        total += sum(t.numel() * t.element_size() for t in absorbed) - nbytes(block.attn.wkv_b)
    return total - (nbytes(block.ffn.experts) if isinstance(block.ffn, MoE) else 0)


def expert_bytes(block) -> float:
    """Weight bytes of one routed expert of a block (0 for a dense block)."""
    from dsv3.core.model import MoE

    return nbytes(block.ffn.experts) / block.ffn.experts.w1.count if isinstance(block.ffn, MoE) else 0.0


def decode_step_bytes(model) -> float:
    """Weight bytes one batch-1 decode step reads: each layer's fixed bytes (fixed_step_bytes), the k routed experts
    of each MoE layer, the final norm and the head; one embedding row is left out."""
    k = model.cfg.num_experts_per_tok
    layers = sum(fixed_step_bytes(b) + k * expert_bytes(b) for b in model.layers)
    return nbytes(model.head) + nbytes(model.norm) + layers


def copy_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """This machine's memory bandwidth as a plain copy of `mib` MiB (far past any cache) sees it: bytes read plus
    bytes written per second, best of `repeats`."""
    import time

    import torch

    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def checkpoint_tensor_bytes(path) -> tuple[int, int]:
    """(every tensor's bytes, the bytes of the tensors a loaded model holds) of a checkpoint: the second leaves out
    what the model shares rather than loads (the MTP layer's copies of the embedding and the head)."""
    from dsv3.core import names as N
    from dsv3.core.checkpoint import Checkpoint
    from dsv3.core.config import ModelConfig

    ckpt = Checkpoint(path)
    layers = ModelConfig.from_file(path).num_hidden_layers
    total = held = 0
    for name in ckpt.names():
        n = ckpt.info(name).nbytes
        total += n
        weight = name[: -len("scale")] + "weight" if name.endswith(".scale") else name
        held += n if N.demo_to_model(weight, layers) is not None else 0
    ckpt.close()
    return total, held


def l3_bytes() -> int | None:
    """This CPU's level-3 cache in bytes as the kernel reports it, or None where it does not say."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                return int((index / "size").read_text().strip().rstrip("K")) * 1024
        except (OSError, ValueError):
            pass
    return None


def l3_size() -> str:
    """This CPU's level-3 cache as the kernel reports it ("32 MiB"), or "its" where it does not say."""
    size = l3_bytes()
    if size is None:
        return "its"
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size // 1024} KiB"


def cpu_line() -> str:
    """The CPU and the vector extensions that decide torch's and our kernels' speed (machines differ: say which)."""
    from dsv3.backends.cpu import native

    flags = set(native._cpu_flags().split(":", 1)[-1].split())
    shown = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vbmi", "avx512_bf16", "avx512_vnni",
                         "amx_tile", "amx_bf16") if f in flags]
    return f"{native.cpu_name()}, {os.cpu_count()} cores visible ({', '.join(shown) or 'no x86 vector flags'})"
