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
@click.option("--train-mtp", "train_steps", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="STEPS", help="Then train the MTP layer (main model frozen) for STEPS Adam steps on the main "
              "model's own greedy text, so `--speculative mtp` has drafts that land (CPU; ~1 minute per 1000 steps "
              "on the tiny size). Prints the acceptance it reaches on unseen prompts.")
def demo(dst: Path, size: str, seed: int, bf16: bool, shards: int, force: bool, train_steps: int) -> None:
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
    if train_steps:
        _train(dst, config, seed, shards, bf16, train_steps)


def _train(dst: Path, config: dict, seed: int, shards: int, bf16: bool, steps: int) -> None:
    import sys

    import torch
    from tqdm import tqdm

    from .. import load
    from ..core.speculative import speculative_generate
    from ..synthetic import write_checkpoint
    from ..synthetic.train_mtp import N_SEQ, train_mtp

    engine = load(dst, backend="cpu", dtype="fp32")
    click.echo(f"training data: the main model's greedy continuations of {N_SEQ} random prompts", err=True)
    bar = tqdm(total=steps, desc="training the MTP layer", file=sys.stderr, disable=not sys.stderr.isatty())

    def progress(i, n, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    trained = train_mtp(engine, steps=steps, seed=seed, progress=progress)
    bar.close()
    write_checkpoint(dst, config, seed=seed, n_shards=shards, fp8=not bf16, overrides=trained)
    engine = load(dst, backend="cpu", dtype="fp32")  # what was written, FP8 rounding included
    g = torch.Generator().manual_seed(seed + 12345)
    prompts = [torch.randint(1, config["vocab_size"], (6,), generator=g).tolist() for _ in range(8)]
    _, stats = speculative_generate(engine.model, prompts, 48, 1, eos_ids=(), adaptive=False)
    _, chained = speculative_generate(engine.model, prompts, 48, 2, eos_ids=(), adaptive=False)  # on its own output
    click.echo(f"trained the MTP layer ({steps} steps): acceptance {stats.extra['acceptance']:.0%} of one draft per "
               f"step on 8 unseen prompts ({stats.extra['tokens_per_round']:.2f} tokens per step); chained for 2 "
               f"drafts per step, {chained.extra['acceptance']:.0%} ({chained.extra['tokens_per_round']:.2f} tokens "
               "per step)")
