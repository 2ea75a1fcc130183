from __future__ import annotations

import sys
from pathlib import Path

import click

from ..core.errors import DsvError

_src = click.argument("src", type=click.Path(path_type=Path))
_dst = click.argument("dst", type=click.Path(path_type=Path))
_force = click.option("--force", is_flag=True, help=(
    "Replace an earlier dsv3 convert output at DST (recognised by its dsv3-manifest.json, holding nothing "
    "else), once the new one is complete. Never replaces other data, a symlink, the current or home "
    "directory, or a directory containing SRC."))
_resume = click.option("--resume", is_flag=True, help=(
    "Continue an interrupted run of the same command, options and unchanged SRC, keeping the files it "
    "finished (re-hashed first); anything else is refused."))
_quiet = click.option("--quiet", is_flag=True, help="No progress bar (for scripts).")


@click.group()
def convert() -> None:
    """Offline checkpoint conversion on any machine (no GPU needed).

    \b
    Every command streams (memory ~ one shard + one tensor), writes to a hidden sibling
    `.DST.partial` directory and renames it into place when done, so an interrupted run never
    leaves a DST that looks complete. SRC is never modified, and is validated as `dsv3 run`
    validates it (headers, index, config, NaN bytes, scales) before anything is kept.

    \b
    DST rules:
      new or empty   written
      not empty      refused, unless --force and it is an earlier dsv3 convert output
                     (its dsv3-manifest.json lists every file in it)
      never          a symlink, SRC or a directory containing it, the current or home directory
    --resume continues an interrupted run (after a kill or a full disk) when the command,
    options and SRC (config, index, shard sizes and times) are unchanged; otherwise it says why.
    """


@convert.command()
@_src
@_dst
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@_force
@_resume
@_quiet
def dequant(src, dst, dtype, force, resume, quiet) -> None:
    """Released FP8 -> HF layout in bf16/fp16/fp32 (loads in transformers and every dsv3 backend).

    Each FP8 weight becomes round(fp8 x scale) computed in fp32 and cast once; *_scale_inv
    tensors are dropped; config.json loses quantization_config.
    """
    from ..convert import dequant as run

    run(src, dst, dtype=dtype, force=force, resume=resume, quiet=quiet)
    click.echo(f"wrote {dst}", err=True)


@convert.command()
@_src
@_dst
@click.option("--model-parallel", "mp", type=int, required=True, help="Number of ranks (N).")
@click.option("--dtype", type=click.Choice(["fp8", "bf16"]), default=None,
              help="fp8 keeps the released weights; bf16 dequantizes in the same pass. Default: the source's.")
@_force
@_resume
@_quiet
def reshard(src, dst, mp, dtype, force, resume, quiet) -> None:
    """HF layout -> model{rank}-mp{N}.safetensors (the official demo's names and split rules).

    The MTP layer goes to mtp{rank}-mp{N}.safetensors so the demo's strict loader still works.
    """
    from ..convert import reshard as run

    run(src, dst, mp, dtype=dtype, force=force, resume=resume, quiet=quiet)
    click.echo(f"wrote {dst}", err=True)


@convert.command()
@_src
@_dst
@_force
@_resume
@_quiet
def fnuz(src, dst, force, resume, quiet) -> None:
    """e4m3fn -> e4m3fnuz for MI300-class GPUs (same bytes reinterpreted, scales doubled, -0 -> 0)."""
    from ..convert import fnuz as run

    run(src, dst, force=force, resume=resume, quiet=quiet)
    click.echo(f"wrote {dst}", err=True)


@convert.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--checksums", is_flag=True, help="Also compare file contents with the manifest dsv3 convert wrote.")
@_quiet
def verify(ckpt, checksums, quiet) -> None:
    """Check a checkpoint in any layout (released FP8, BF16, rank files) as `dsv3 run` would load it.

    Headers and offsets, index/shard agreement, config.json, every tensor's name, shape and dtype,
    NaN/Inf values and FP8 NaN bytes, block scales, and the manifest (sizes; hashes with
    --checksums). Lists every problem found, one per line; exit 2 if any.
    """
    from ..convert import verify as run

    problems = run(ckpt, checksums=checksums, quiet=quiet)
    if problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        raise DsvError(f"{ckpt}: {len(problems)} problem(s) found")
    click.echo(f"{ckpt}: ok")
    sys.stdout.flush()
