from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import DsvError


@click.command()
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "280m"]), default="tiny", show_default=True,
              help="tiny: seconds on any CPU. 280m: the benchmark model (hidden 1024, 8 layers, 32 experts).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for the weights.")
@click.option("--bf16", is_flag=True, help="Write the BF16 HF layout instead of the released FP8 one.")
@click.option("--shards", type=int, default=4, show_default=True, help="Number of safetensors shards.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty DST.")
def demo(dst: Path, size: str, seed: int, bf16: bool, shards: int, force: bool) -> None:
    """Write a random DeepSeek-V3-architecture checkpoint to DST, in the released layout.

    Config, index, several shards, FP8 weights with 128x128 block scales (some scales in a
    different shard than their weight), an MTP layer, and a small byte-level BPE tokenizer with
    DeepSeek's special tokens and chat template. The text it generates is noise: the point is
    to exercise every code path offline.
    """
    from ..synthetic import BENCH_280M, DEMO, write_checkpoint

    if dst.exists() and any(dst.iterdir()) and not force:
        raise DsvError(f"{dst}: exists and is not empty; choose another path or pass --force")
    if shards < 1:
        raise DsvError(f"--shards={shards}; use 1 or more")
    config = DEMO if size == "tiny" else BENCH_280M
    write_checkpoint(dst, config, seed=seed, n_shards=shards, fp8=not bf16)
    click.echo(f"wrote {'BF16' if bf16 else 'FP8'} demo checkpoint ({size}) to {dst}")
