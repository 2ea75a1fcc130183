from __future__ import annotations

import math
import sys
import unicodedata
from pathlib import Path

import click

from ..core.errors import DsvError
from .options import load_options, progress_bar


def _finite(lo: float, hi: float | None = None, lo_open: bool = False):
    """A click callback: a finite number in [lo, hi] (click's FloatRange lets nan and inf through)."""
    def check(ctx, param, value):
        if value is None:
            return value
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo:g}, {'inf)' if hi is None else f'{hi:g}]'}"
            raise click.BadParameter(f"{value} is not a finite number in {rng}")
        return value
    return check


def _text(value: str, what: str) -> str:
    """Arguments and stdin arrive surrogate-escaped when they are not UTF-8: refuse them in one line."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DsvError(f"{what} is not valid UTF-8 text; pass text, not binary data") from None
    return value


def _schema(path: Path) -> dict:
    """--json-schema's file, read and checked before minutes of loading weights."""
    import json

    from ..serve.schema import SchemaError, compile_schema

    if not path.is_file():
        raise DsvError(f"--json-schema {path}: no such file; give a JSON schema file, e.g. {{\"type\": \"object\"}}")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        compile_schema(schema)
    except (UnicodeDecodeError, ValueError) as e:  # json's errors and SchemaError are ValueErrors
        what = str(e) if isinstance(e, SchemaError) else f"not JSON ({e})"
        raise DsvError(f"--json-schema {path}: {what}") from None
    return schema


def printable(text: str, keep: str = "\n\t") -> str:
    """Generated text as the terminal should show it: control characters (\\r, \\x1b, ...) escaped,
    so model output cannot move the cursor or restyle the terminal; `keep` (newlines and tabs) kept."""
    return "".join(c if c in keep or (c.isprintable() and not unicodedata.category(c).startswith("C"))
                   else c.encode("unicode_escape").decode("ascii") for c in text)


@click.command()
@load_options
@click.option("--prompt", default=None, help="One prompt.")
@click.option("--input-file", type=click.Path(path_type=Path), default=None,
              help="A file with one prompt per line; all are run as one batch.")
@click.option("--interactive", is_flag=True, help="Multi-turn chat on stdin; /clear resets, /exit quits.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, callback=_finite(0.0),
              help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, callback=_finite(0.0, 1.0, lo_open=True),
              help="Nucleus sampling: keep the smallest set of tokens whose probability reaches P, in (0, 1].")
@click.option("--seed", type=int, default=None, help="Seed for sampling (temperature > 0).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Context length to allocate (default: min(max_position_embeddings, 4096)).")
@click.option("--attn", type=click.Choice(["auto", "naive", "absorb"]), default="auto", show_default=True,
              help="MLA form: auto = naive for prefill, absorbed for decode.")
@click.option("--raw", is_flag=True, help="Send prompts as plain text, without the chat template.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="Capture the decode step once and replay it per token: a CUDA/HIP graph per batch bucket on "
                   "cuda/rocm, a recorded step on cpu (bf16); off runs it eagerly, for debugging.")
@click.option("--speculative", type=click.Choice(["mtp"]), default=None,
              help="Draft with the checkpoint's MTP layer and verify the drafts in one step: the same greedy "
                   "tokens (the same distribution when sampling) in fewer steps. Stats report the acceptance.")
@click.option("--draft-tokens", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Drafts per step with --speculative (1 is the MTP layer's design; more chain it on itself).")
@click.option("--json", "json_object", is_flag=True,
              help="Answer with one JSON object: each token is masked to what continues one, and the answer ends "
                   "where the object closes (one cut by --max-new-tokens is its beginning). With --speculative, "
                   "each drafted token is masked as if the drafts before it were accepted: the same answer.")
@click.option("--json-schema", "json_schema", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Answer with JSON that this schema (a .json file) accepts, as the server's response_format "
                   "json_schema: what pydantic's model_json_schema() writes for common types (objects, lists, "
                   "tuples, dicts, enums, unions, $ref, strings' pattern/format/lengths, numbers' bounds and "
                   "multipleOf; the README lists the keywords). A keyword it cannot keep is refused by name before "
                   "the weights load. Implies --json.")
@click.pass_context
def run(ctx, ckpt: Path, backend, dtype, device, cpu_weights, prompt, input_file, interactive, max_new_tokens, temperature,
        top_p, seed, max_seq_len, attn, raw, cuda_graphs, speculative, draft_tokens, json_object,
        json_schema) -> None:
    """Generate text from a checkpoint: released FP8, BF16 HF layout, or model-parallel rank files.

    \b
    Examples:
      dsv3 run CKPT --prompt "Explain MLA in one sentence."
      dsv3 run CKPT --input-file prompts.txt --max-new-tokens 128   # one batch
      dsv3 run CKPT --interactive --temperature 0.6 --top-p 0.95
      dsv3 run CKPT --prompt "Three primes as a JSON object." --json
      dsv3 run CKPT --prompt "A person as JSON." --json-schema person.schema.json
    Prints the completions, then prefill and decode tokens/s on stderr.
    """
    from .. import load

    sources = sum(x is not None and x is not False for x in (prompt, input_file, interactive or None))
    if sources != 1:
        raise DsvError("give exactly one of --prompt, --input-file or --interactive")
    answer_json = json_object or (_schema(json_schema) if json_schema is not None else False)
    # a JSON answer holds no control character but its whitespace: \r stays, so the output parses as printed
    keep = "\n\t\r" if answer_json is not False else "\n\t"
    from ..core.parallel import Parallel

    par = Parallel.from_env()  # one context, handed to load: only rank 0 reads prompts and draws bars
    is_main = par.is_main
    prompts: list[str] = []
    if input_file is not None and is_main:  # under torchrun only rank 0 reads; the others get a broadcast
        if not input_file.is_file():
            raise DsvError(f"{input_file}: no such file; --input-file takes a text file with one prompt per line")
        try:
            prompts = [line for line in input_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise DsvError(f"{input_file}: not UTF-8 text (byte {e.start}); --input-file takes a text file with one "
                           "prompt per line") from None
        if not prompts:
            raise DsvError(f"{input_file}: no prompts (the file has no non-empty lines)")
    elif prompt is not None:
        prompts = [_text(prompt, "--prompt")]

    update, close = progress_bar(sys.stderr.isatty() and is_main)
    try:
        engine = load(ckpt, backend=backend, dtype=dtype, device=device, attn_impl=attn, max_seq_len=max_seq_len,
                      parallel=par, progress=update, require_tokenizer=True, cuda_graphs=cuda_graphs,
                      cpu_weights=cpu_weights)  # tokenizer checked before the weights
    finally:
        close()
    tok = engine.tokenizer  # there: tokenizer.json was checked before loading
    main = par.is_main
    prompts = par.broadcast_object(prompts)
    if ctx.obj.get("verbose"):  # `dsv3 --verbose run ...`
        from ..engine import resident_bytes

        click.echo(f"dsv3: rank {par.rank}/{par.world_size}: {engine.kernels.describe()}; "
                   f"resident weights {resident_bytes(engine) / 2**20:.1f} MiB; mtp={'yes' if engine.has_mtp else 'no'}",
                   err=True)

    def encode(messages: list[dict]) -> list[int]:
        if raw:
            return tok.encode(messages[-1]["content"])
        return tok.encode_chat(messages)

    def complete(batch: list[list[int]]) -> list[str]:
        out = engine.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              speculative=speculative, draft_tokens=draft_tokens, json=answer_json)
        return [tok.decode(ids) for ids in out]

    if not interactive:
        texts = complete([encode([{"role": "user", "content": p}]) for p in prompts])
        if main:
            for p, t in zip(prompts, texts):
                if len(prompts) > 1:
                    click.echo(f"### {p}")
                click.echo(printable(t, keep))
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
                _text(line, "input")
            except EOFError:  # Ctrl-D: leave the prompt line cleanly
                line = ""
                click.echo("", err=True)
            except UnicodeDecodeError:
                raise DsvError("stdin is not UTF-8 text; --interactive reads text lines") from None
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
            click.echo(printable(reply, keep))
            click.echo(engine.last_stats.line(), err=True)
