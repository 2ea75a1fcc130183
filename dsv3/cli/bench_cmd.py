"""`dsv3 bench`: how fast a checkpoint prefills and decodes on this machine, per batch size and prompt length.

Each configuration runs `engine.generate` on random prompts (seeded, so every rank and every rerun reads the same
tokens), once to warm up (the decode step is captured there, lazily made weights are made) and then --repeats
times; the table shows the medians. With --speculative every configuration also runs with MTP drafting, the two
modes in turn, and the speed-up is the median of the ratios of runs made side by side.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
from pathlib import Path

import click
import torch

from ..core.errors import DsvError
from .options import load_options, progress_bar


def _sizes(ctx, param, value: str) -> list[int]:
    """A click callback: '1,8,32' -> [1, 8, 32] (positive, in the order given, repeats dropped)."""
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: expected positive integers separated by commas, such as 1,8,32")
    return list(dict.fromkeys(sizes))


def _peak_device_bytes(device: torch.device) -> int | None:
    """The accelerator's peak allocated bytes since the last reset (cuda, rocm, npu), or None on a CPU."""
    mod = getattr(torch, device.type, None) if device.type != "cpu" else None
    peak = getattr(mod, "max_memory_allocated", None)
    return int(peak(device)) if peak is not None else None


def _reset_peak(device: torch.device) -> None:
    mod = getattr(torch, device.type, None) if device.type != "cpu" else None
    reset = getattr(mod, "reset_peak_memory_stats", None)
    if reset is not None:
        reset(device)


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def measure(engine, batch: int, prompt_len: int, new_tokens: int, repeats: int, seed: int,
            modes: tuple[str | None, ...] = (None,), draft_tokens: int = 1, tick=lambda: None) -> list[dict]:
    """One configuration: `batch` random prompts of `prompt_len` tokens, exactly `new_tokens` new tokens each
    (end-of-sequence ignored), in each mode (None: plain decode; "mtp": drafting): a warm-up run per mode, then
    `repeats` rounds that run every mode once, in turn, the order rotated from round to round (no mode always
    follows the same one). Returns one table row per mode, the medians of its timed runs; a drafting row's
    `vs_plain` is the median over the rounds of its decode speed over plain decode's in the same round (a shared
    machine's speed can swing 2x within seconds: a slow spell then hits both runs of a ratio, where a ratio of
    two medians read 0.83-1.42x for the same build)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + prompt_len)
    prompts = torch.randint(0, engine.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    device = engine.kernels.device
    runs: dict[str | None, list] = {m: [] for m in modes}
    peaks: dict[str | None, int | None] = {}
    for i in range(repeats + 1):
        turn = i % len(modes) if i else 0
        for mode in modes[turn:] + modes[:turn]:
            if i == 0:
                _reset_peak(device)
            engine.generate(prompts, max_new_tokens=new_tokens, speculative=mode, draft_tokens=draft_tokens,
                            ignore_eos=True)
            if i == 0:  # the warm-up: what it allocates is what the mode needs
                peaks[mode] = _peak_device_bytes(device)
            else:
                runs[mode].append(engine.last_stats)
            tick()
    engine.release()  # this shape's captured steps and caches: the next configuration needs the memory
    rows = []
    later = new_tokens - 1  # tokens after the first, which the prompt's forward already gives
    for mode in modes:
        stats = runs[mode][-1]
        prefill_s = statistics.median(s.prefill_s for s in runs[mode])
        decode_s = statistics.median(s.decode_s for s in runs[mode])
        rows.append({
            "mode": f"mtp k={draft_tokens}" if mode else "plain",
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_ms": 1e3 * prefill_s, "prefill_tok_s": batch * prompt_len / prefill_s,
            "decode_tok_s": batch * later / decode_s, "ms_per_token": 1e3 * decode_s / later,
            "decode_step": stats.extra.get("decode_step", "eager"),
            "acceptance": stats.extra.get("acceptance"),
            "vs_plain": None if mode is None or None not in runs else
            statistics.median(p.decode_s / max(s.decode_s, 1e-12) for p, s in zip(runs[None], runs[mode])),
            "peak_device_bytes": peaks[mode],
        })
    return rows


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table (markdown-compatible), with the speed-up of drafting where both ran."""
    head = ["mode", "batch", "prompt", "new", "prefill ms", "prefill tok/s", "decode tok/s", "ms/token", "step",
            "acceptance", "vs plain", "peak mem"]
    body = []
    for r in rows:
        ratio = r["vs_plain"]  # drafting rows: measure's median of paired ratios
        mem = r["peak_device_bytes"]
        body.append([r["mode"], str(r["batch"]), str(r["prompt_len"]), str(r["new_tokens"]),
                     _cell(r["prefill_ms"], ".1f"), _cell(r["prefill_tok_s"], ".0f"), _cell(r["decode_tok_s"], ".1f"),
                     _cell(r["ms_per_token"], ".2f"), r["decode_step"],
                     "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
                     "-" if ratio is None else f"{ratio:.2f}x", "-" if mem is None else _size(mem)])
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


@click.command()
@load_options
@click.option("--batch", "batches", default="1,8", show_default=True, callback=_sizes,
              help="Batch sizes to measure, comma-separated.")
@click.option("--prompt-len", "prompt_lens", default="32,512", show_default=True, callback=_sizes,
              help="Prompt lengths in tokens, comma-separated (random token ids).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="Tokens generated per prompt (end-of-sequence ignored, so every run decodes as many).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per configuration after one warm-up run; the table shows their medians.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompts.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Context length to allocate (default: the longest prompt + new tokens, with room for drafts).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="Capture the decode step (a CUDA/HIP graph on cuda/rocm, a recorded step on cpu); off: eager.")
@click.option("--speculative", type=click.Choice(["mtp"]), default=None,
              help="Also run every configuration with MTP drafting and show its speed against plain decode.")
@click.option("--draft-tokens", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Drafts per step with --speculative.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, allow_dash=True), default=None,
              help="Also write the rows and the machine as JSON to this file ('-': stdout, instead of the table).")
def bench(ckpt: Path, backend, dtype, device, cpu_weights, batches, prompt_lens, new_tokens, repeats, seed,
          max_seq_len, cuda_graphs, speculative, draft_tokens, json_out) -> None:
    """Measure prefill and decode speed of a checkpoint on this machine.

    \b
    Examples:
      dsv3 bench CKPT                                   # batch 1 and 8, prompts of 32 and 512 tokens
      dsv3 bench CKPT --batch 1,4,16,32 --prompt-len 128 --new-tokens 128
      dsv3 bench CKPT --batch 1 --speculative mtp       # plain and MTP drafting side by side
      dsv3 bench CKPT --json results.json
    Random prompts, end-of-sequence ignored; one warm-up run per configuration (graph capture happens there),
    then the median of --repeats runs. prefill ms is the prompt's forward up to the first token (time to first
    token); decode tok/s counts every row's tokens after the first; ms/token is per row. vs plain (--speculative):
    the median, over the repeats, of drafting's decode speed over plain decode's run beside it. Under torchrun
    every rank runs and rank 0 prints.
    """
    from .. import load
    from ..core.parallel import Parallel
    from ..engine import resident_bytes

    room = 2 * draft_tokens + 2 if speculative else 0
    need = max(prompt_lens) + new_tokens + room
    if max_seq_len is not None and need > max_seq_len:
        raise DsvError(f"--prompt-len {max(prompt_lens)} + --new-tokens {new_tokens}"
                       f"{f' + {room} for drafts' if room else ''} = {need} tokens exceeds --max-seq-len {max_seq_len}; "
                       "lower them or raise --max-seq-len")
    if json_out is not None and str(json_out) != "-" and not json_out.parent.is_dir():  # before minutes of runs
        raise DsvError(f"--json {json_out}: there is no directory {json_out.parent}; create it or pick another path")
    par = Parallel.from_env()
    update, close = progress_bar(sys.stderr.isatty() and par.is_main)
    try:
        engine = load(ckpt, backend=backend, dtype=dtype, device=device, max_seq_len=max_seq_len or need,
                      parallel=par, progress=update, cuda_graphs=cuda_graphs, cpu_weights=cpu_weights)
    finally:
        close()
    if speculative and not engine.has_mtp:
        raise DsvError(f"{ckpt}: this checkpoint has no MTP layer (num_nextn_predict_layers=0 or dropped); run the "
                       "benchmark without --speculative")
    modes = (None, speculative) if speculative else (None,)
    configs = [(b, p) for b in batches for p in prompt_lens]
    bar = None
    if sys.stderr.isatty() and par.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(configs) * len(modes) * (repeats + 1), desc="bench", unit="run", file=sys.stderr,
                   leave=False)
    try:
        rows = [row for b, p in configs for row in measure(engine, b, p, new_tokens, repeats, seed, modes,
                                                           draft_tokens, tick=bar.update if bar else lambda: None)]
    finally:
        if bar is not None:
            bar.close()
    if not par.is_main:
        return
    kernels = engine.kernels
    machine = {"backend": kernels.describe(), "dtype": dtype, "world_size": par.world_size,
               "resident_weight_bytes": resident_bytes(engine), "peak_rss_bytes": _peak_rss_bytes(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "checkpoint": str(ckpt)}
    if json_out is not None:
        text = json.dumps({"machine": machine, "rows": rows}, indent=2)
        if str(json_out) == "-":
            click.echo(text)
            return
        json_out.write_text(text + "\n")
    click.echo(f"{ckpt.name}: {machine['backend']}; {dtype}; weights {_size(machine['resident_weight_bytes'])} per "
               f"rank x {par.world_size}; torch {machine['torch']}, {machine['threads']} threads")
    click.echo(table(rows))
    click.echo(f"median of {repeats} run(s) after a warm-up; peak resident memory of this process "
               f"{_size(machine['peak_rss_bytes'])}")
