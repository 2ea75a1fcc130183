"""What `run`, `serve` and `bench` share: the checkpoint and how to load it, and the loading bar."""

from __future__ import annotations

import sys
from pathlib import Path

import click

#: what FP8 checkpoint weights become in the cpu backend's memory
CPU_WEIGHTS = click.option(
    "--cpu-weights", type=click.Choice(["auto", "fp8", "bf16"]), default="auto", show_default=True,
    help="cpu backend: keep FP8 weights as FP8 in memory (half the RAM of bf16, fewer bytes per token) or "
         "dequantize them to bf16 at load. auto = fp8 for --dtype bf16 where the C kernels build.")

_LOAD = [
    click.argument("ckpt", type=click.Path(path_type=Path)),
    click.option("--backend", default="auto", show_default=True,
                 help="auto, cpu, cuda, rocm, ascend, or a plugin's name (see `dsv3 backends`)."),
    click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
                 help="Activation/weight dtype for dequantized weights."),
    click.option("--device", default=None, help="Override the backend's device (e.g. cpu, cuda:1)."),
    CPU_WEIGHTS,
]


def load_options(command):
    """CKPT, --backend, --dtype, --device and --cpu-weights, as every command that loads a checkpoint takes them."""
    for decorate in reversed(_LOAD):
        command = decorate(command)
    return command


def progress_bar(enabled: bool):
    """(update(nbytes, total), close) for load(progress=...): a bar of bytes read on stderr, or nothing."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, desc="loading", file=sys.stderr, leave=False)

    def update(n: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(n)

    return update, bar.close
