from __future__ import annotations

import sys
from pathlib import Path

import click

from ..core.errors import DsvError


def _progress_bar(enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, desc="loading", file=sys.stderr, leave=False)
    return bar.update, bar.close


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--backend", default="auto", show_default=True,
              help="auto, cpu, cuda, rocm, ascend, or a plugin's name (see `dsv3 backends`).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Activation/weight dtype for dequantized weights.")
@click.option("--device", default=None, help="Override the backend's device (e.g. cpu, cuda:1).")
@click.option("--prompt", default=None, help="One prompt.")
@click.option("--input-file", type=click.Path(path_type=Path), default=None,
              help="A file with one prompt per line; all are run as one batch.")
@click.option("--interactive", is_flag=True, help="Multi-turn chat on stdin; /clear resets, /exit quits.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling (temperature > 0).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Context length to allocate (default: min(max_position_embeddings, 4096)).")
@click.option("--attn", type=click.Choice(["auto", "naive", "absorb"]), default="auto", show_default=True,
              help="MLA form: auto = naive for prefill, absorbed for decode.")
@click.option("--raw", is_flag=True, help="Send prompts as plain text, without the chat template.")
@click.option("--verbose", is_flag=True, help="Report the backend and each rank's resident weight memory.")
@click.pass_context
def run(ctx, ckpt: Path, backend, dtype, device, prompt, input_file, interactive, max_new_tokens, temperature,
        top_p, seed, max_seq_len, attn, raw, verbose) -> None:
    """Generate text from a checkpoint: released FP8, BF16 HF layout, or model-parallel rank files.

    \b
    Examples:
      dsv3 run CKPT --prompt "Explain MLA in one sentence."
      dsv3 run CKPT --input-file prompts.txt --max-new-tokens 128   # one batch
      dsv3 run CKPT --interactive --temperature 0.6 --top-p 0.95
    Prints the completions, then prefill and decode tokens/s on stderr.
    """
    from .. import load

    sources = sum(x is not None and x is not False for x in (prompt, input_file, interactive or None))
    if sources != 1:
        raise DsvError("give exactly one of --prompt, --input-file or --interactive")
    from ..core.parallel import Parallel

    is_main = Parallel.from_env().is_main
    prompts: list[str] = []
    if input_file is not None and is_main:  # under torchrun only rank 0 reads; the others get a broadcast
        if not input_file.is_file():
            raise DsvError(f"{input_file}: no such file; --input-file takes a text file with one prompt per line")
        prompts = [line for line in input_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise DsvError(f"{input_file}: no prompts (the file has no non-empty lines)")
    elif prompt is not None:
        prompts = [prompt]

    update, close = _progress_bar(sys.stderr.isatty() and is_main)
    try:
        engine = load(ckpt, backend=backend, dtype=dtype, device=device, attn_impl=attn, max_seq_len=max_seq_len,
                      progress=update)
    finally:
        close()
    tok = engine.tokenizer
    if tok is None:
        raise DsvError(
            f"{ckpt}: no tokenizer.json; copy tokenizer.json and tokenizer_config.json from the original checkpoint"
        )
    par = engine.par
    main = par.is_main
    prompts = par.broadcast_object(prompts)
    if verbose or ctx.obj.get("verbose"):
        from ..engine import resident_bytes

        click.echo(f"dsv3: rank {par.rank}/{par.world_size}: {engine.kernels.describe()}; "
                   f"resident weights {resident_bytes(engine) / 2**20:.1f} MiB; mtp={'yes' if engine.has_mtp else 'no'}",
                   err=True)

    def encode(messages: list[dict]) -> list[int]:
        if raw:
            return tok.encode(messages[-1]["content"])
        return tok.encode_chat(messages)

    def complete(batch: list[list[int]]) -> list[str]:
        out = engine.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return [tok.decode(ids) for ids in out]

    if not interactive:
        texts = complete([encode([{"role": "user", "content": p}]) for p in prompts])
        if main:
            for p, t in zip(prompts, texts):
                if len(prompts) > 1:
                    click.echo(f"### {p}")
                click.echo(t)
            click.echo(engine.last_stats.line(), err=True)
        return

    messages: list[dict] = []
    if main:
        click.echo("interactive: type a message; /clear starts over, /exit quits", err=True)
    while True:
        line = ""
        if main:
            try:
                line = input(">>> ") if sys.stdin.isatty() else sys.stdin.readline()
            except EOFError:
                line = ""
        line = par.broadcast_object(line)  # every rank decodes the same turn
        if line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/clear":
            messages.clear()
            if main:
                click.echo("(cleared)", err=True)
            continue
        messages.append({"role": "user", "content": line})
        ids = encode(messages)
        if len(ids) + max_new_tokens > engine.max_seq_len:
            if main:
                click.echo(f"context full ({len(ids)} tokens); /clear to start over", err=True)
            messages.pop()
            continue
        reply = complete([ids])[0]
        messages.append({"role": "assistant", "content": reply})
        if main:
            click.echo(reply)
            click.echo(engine.last_stats.line(), err=True)
