"""`dsv3 serve` under load, against `engine.generate` on the same prompts, side by side in one run.

The ~280M-parameter model (bf16, cpu backend), written with a tokenizer. First `engine.generate` runs
the 16 prompts as one batch in this process (the ceiling: no HTTP, no scheduling); then a real server
subprocess is loaded with the `openai` async client at 1, 4 and 16 concurrent clients (client i sends
prompt i), and reports output tok/s, time to first token and time per output token (p50/p99, measured
by the client); `n` = 8 answers of one 1024-token prompt in one request vs 8 requests; the next turn of a
1024-token conversation (the prefix cache). Last, chunked
prefill: the time to first token of a short request sent while a 2048-token prompt is being prefilled, in
units of a batch-1 decode step. Writes the table to
benchmarks/RESULTS.md.

    python benchmarks/serve_load.py [--new-tokens 64] [--workdir DIR]
    python benchmarks/serve_load.py --smoke      # the demo model, a few tokens (the test suite runs this)
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import append_section, cpu_line, parser  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def start_server(ckpt: Path, max_batch: int, dtype: str, *extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dsv3", "serve", str(ckpt), "--backend", "cpu", "--dtype", dtype, "--port", "0",
           "--max-batch", str(max_batch), "--served-model-name", "bench", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        m = re.search(r"serving .* on (http://\S+) ", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def one(client, prompt: list[int], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"return_token_ids": True})
    stamps, n = [], 0
    async for ch in stream:
        for c in ch.choices:
            k = len((c.model_extra or {}).get("token_ids") or [])
            if k:
                stamps.append(time.perf_counter())
                n += k
    return {"ttft": stamps[0] - t0, "tpot": (stamps[-1] - stamps[0]) / max(1, n - 1), "tokens": n,
            "end": stamps[-1], "start": t0}


async def load(client, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    rs = await asyncio.gather(*(one(client, prompts[i], max_tokens) for i in range(clients)))
    wall = max(r["end"] for r in rs) - min(r["start"] for r in rs)
    return {"tps": sum(r["tokens"] for r in rs) / wall, "ttft": [r["ttft"] for r in rs],
            "tpot": [r["tpot"] for r in rs], "tokens": sum(r["tokens"] for r in rs)}


async def best_of_two(client, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    """load() twice, the faster run (like engine.generate's best-of in this script)."""
    a, b = await load(client, prompts, clients, max_tokens), await load(client, prompts, clients, max_tokens)
    return a if a["tps"] >= b["tps"] else b


async def shared_prompt(client, prompts: tuple[list[int], list[int]], n: int, max_tokens: int) -> tuple[float, float]:
    """Seconds for n sampled answers of a prompt: one request with `n` (the prompt read once, its cache entries
    copied) vs n requests at once (read n times). Two fresh prompts of one length, none of it cached (the prefix
    cache would find the first's entries for the second)."""
    t0 = time.perf_counter()
    await client.completions.create(model="bench", prompt=prompts[0], n=n, max_tokens=max_tokens, temperature=1.0,
                                    seed=1, extra_body={"ignore_eos": True})
    together = time.perf_counter() - t0
    t0 = time.perf_counter()
    await asyncio.gather(*(client.completions.create(model="bench", prompt=prompts[1], max_tokens=max_tokens,
                                                     temperature=1.0, seed=1 + j, extra_body={"ignore_eos": True})
                           for j in range(n)))
    return together, time.perf_counter() - t0


async def next_turn(client, history: list[int], new: list[int]) -> tuple[float, float]:
    """Time to first token of a conversation's first turn (a fresh history, read whole) and of its next turn (history,
    the answer, new tokens: the prefix cache finds the first turn's entries and reads only the answer and the new)."""
    first = await one(client, history, 16)
    answer = await client.completions.create(model="bench", prompt=history, max_tokens=16, temperature=0,
                                             extra_body={"return_token_ids": True})
    follow = await one(client, history + answer.choices[0].model_extra["token_ids"] + new, 16)
    return first["ttft"], follow["ttft"]


async def prefill_interference(client, long_prompt: list[int], short: list[int], tries: int) -> tuple[list, list]:
    """TTFT of a short request alone, and while a long prompt is being prefilled (sent `delay` after it)."""
    alone, during = [], []
    for i in range(tries):
        alone.append((await one(client, short, 1))["ttft"])
        big = asyncio.create_task(one(client, long_prompt, 1))
        await asyncio.sleep(0.2 + 0.1 * i)  # somewhere inside the long prefill
        r = await one(client, short, 1)
        b = await big
        if r["end"] < b["end"]:  # it really was served during the long prefill
            during.append(r["ttft"])
    return alone, during


async def under_load(client, background: list[list[int]], long_prompt: list[int], short: list[int], tries: int):
    """A serving scene: len(background) streams decoding; a long prompt arrives, then a short request while the long
    one is being prefilled. Returns (TTFTs of the short request, the running batch's decode step before the long
    prompt came: the median gap between a background stream's tokens)."""
    gaps, ttfts, stop = [], [], asyncio.Event()

    async def stream(prompt):
        s = await client.completions.create(model="bench", prompt=prompt, max_tokens=100000 // 64, temperature=0,
                                            stream=True, extra_body={"return_token_ids": True})
        last = None
        async for _ in s:
            now = time.perf_counter()
            if last is not None and not measuring_done[0]:
                gaps.append(now - last)
            last = now
            if stop.is_set():
                break
        await s.close()

    measuring_done = [False]
    tasks = [asyncio.create_task(stream(p)) for p in background]
    await asyncio.sleep(3.0)  # every stream prefilled and decoding: the gaps now are the batch's decode step
    measuring_done[0] = True
    step = statistics.median(gaps[len(gaps) // 2:])
    for i in range(tries):
        big = asyncio.create_task(one(client, long_prompt, 1))
        await asyncio.sleep(0.2 + 0.1 * i)
        r = await one(client, short, 1)
        b = await big
        if r["end"] < b["end"]:
            ttfts.append(r["ttft"])
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return ttfts, step


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="the demo model and a few tokens: checks the script runs")
    args = ap.parse_args()
    import torch

    import dsv3
    from dsv3.synthetic import BENCH_280M, DEMO, write_checkpoint

    name, cfg = ("demo", DEMO) if args.smoke else ("280M", BENCH_280M)
    new, long_len = (8, 300) if args.smoke else (args.new_tokens, 2048)
    work = args.workdir or Path(f"/tmp/dsv3-serve-bench-{name}")
    ckpt = work / "ckpt"
    if not (ckpt / "tokenizer.json").is_file():
        write_checkpoint(ckpt, cfg, seed=0, n_shards=4)
    rng = random.Random(0)
    vocab = cfg["vocab_size"]
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randrange(16, 65))] for _ in range(16)]

    engine = dsv3.load(ckpt, backend="cpu", dtype="bf16")
    engine.generate(prompts[:2], max_new_tokens=4)  # warm-up (the C kernels compile once)
    best = 0.0
    for _ in range(1 if args.smoke else 2):
        t0 = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=new)
        best = max(best, sum(map(len, out)) / (time.perf_counter() - t0))
    del engine
    gc.collect()

    long_prompt = [rng.randrange(1, vocab) for _ in range(long_len)]

    async def against(url):
        import openai

        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
            await load(client, prompts, 2, 4)  # warm-up
            loaded = await under_load(client, prompts[1:9], long_prompt, prompts[0][:8], 2 if args.smoke else 5)
            runs = {c: await best_of_two(client, prompts, c, new) for c in (1, 4, 16)}
            shared = await shared_prompt(client, (fresh(), fresh()), 8, new)
            return runs, await prefill_interference(client, long_prompt, prompts[0][:8], 2 if args.smoke else 5), \
                loaded, shared

    shared_len = 1024 if not args.smoke else 200
    fresh = lambda: [rng.randrange(1, vocab) for _ in range(shared_len)]  # noqa: E731  (no cache entry starts it)
    # every prompt read whole, as engine.generate reads it (the prefix cache would find the repeated prompts)
    proc, url = start_server(ckpt, 16, "bf16", "--no-prefix-cache")
    try:
        runs, (alone, during), (loaded_ttft, loaded_step), shared = asyncio.run(against(url))
    finally:
        stop_server(proc)

    async def conversation(url):
        import openai

        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
            await load(client, prompts, 2, 4)  # warm-up
            tries = [await next_turn(client, fresh(), prompts[1][:16]) for _ in range(3)]
            return min(t[0] for t in tries), min(t[1] for t in tries)

    proc, url = start_server(ckpt, 16, "bf16")
    try:
        turns = asyncio.run(conversation(url))
    finally:
        stop_server(proc)

    async def speculative(url):  # the synthetic MTP layer is random: its drafts should be switched off
        import openai

        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
            await load(client, prompts, 2, 4)  # warm-up
            return {c: await best_of_two(client, prompts, c, new) for c in (1, 16)}

    proc, url = start_server(ckpt, 16, "bf16", "--speculative", "mtp")
    try:
        spec = asyncio.run(speculative(url))
        metrics = {m.group(1): float(m.group(2)) for m in re.finditer(
            r"^(dsv3_spec_\w+) (\S+)$", urllib.request.urlopen(url + "/metrics").read().decode(), re.M)}
    finally:
        stop_server(proc)

    step = statistics.median(runs[1]["tpot"])
    rows = ["| clients | output tok/s | vs engine.generate (16 prompts, one batch) | TTFT p50 / p99 (ms) | "
            "TPOT p50 / p99 (ms) |", "|---|---|---|---|---|"]
    rows.append(f"| engine.generate | {best:.1f} | 1.00x | - | - |")
    for c, r in [*runs.items(), *((f"{c}, `--speculative mtp`", r) for c, r in spec.items())]:
        rows.append(f"| {c} | {r['tps']:.1f} | {r['tps'] / best:.2f}x | {1e3 * pct(r['ttft'], 50):.0f} / "
                    f"{1e3 * pct(r['ttft'], 99):.0f} | {1e3 * pct(r['tpot'], 50):.1f} / {1e3 * pct(r['tpot'], 99):.1f} |")
    drafted, accepted = metrics.get("dsv3_spec_draft_tokens_total", 0), metrics.get("dsv3_spec_accepted_tokens_total", 0)
    drafting = ("off (probing)" if metrics.get("dsv3_spec_drafting") == 0 else "on")
    chunked = (f"Chunked prefill: time to first token of an 8-token request while a {long_len}-token prompt is being "
               f"prefilled: median {1e3 * statistics.median(during):.0f} ms over {len(during)} tries = "
               f"{statistics.median(during) / step:.2f} batch-1 decode steps ({1e3 * step:.1f} ms); "
               f"alone: {1e3 * statistics.median(alone):.0f} ms = {statistics.median(alone) / step:.2f} steps."
               if during else "Chunked prefill: the long prompt finished before the short request (nothing measured).")
    if loaded_ttft:
        chunked += (f" With 8 streams decoding (their step: {1e3 * loaded_step:.0f} ms), the same request sent during the "
                    f"long prefill: median {1e3 * statistics.median(loaded_ttft):.0f} ms = "
                    f"{statistics.median(loaded_ttft) / loaded_step:.2f} decode steps of the running batch.")
    fork = (f"`n` answers of one prompt: 8 sampled answers ({new} tokens) of a {shared_len}-token prompt in one request "
            f"with `n: 8` (the prompt read once, its cache entries copied to the other 7 slots): {shared[0]:.2f} s; as 8 "
            f"requests at once (read 8 times): {shared[1]:.2f} s = "
            f"{shared[1] / shared[0]:.2f}x as long.")
    fork += (f" The next turn of a conversation (the prefix cache): time to first token of a {shared_len}-token first "
             f"turn {1e3 * turns[0]:.0f} ms; of the next turn (that history, a 16-token answer and 16 new tokens) "
             f"{1e3 * turns[1]:.0f} ms ({turns[0] / turns[1]:.1f}x sooner: only the answer and the new tokens are read).")
    switch = (f"`--speculative mtp` with the checkpoint's random MTP layer: {drafted:.0f} tokens drafted, "
              f"{accepted:.0f} accepted; drafting {drafting} at the end (the adaptive switch, serve/drafting.py).")
    text = "\n".join(rows + ["", chunked, "", fork, "", switch, "", f"{name} model, bf16, cpu backend, {new} new tokens per request, "
                             f"prompts of 16-64 tokens, `--max-batch 16`, torch threads {torch.get_num_threads()}; "
                             f"{cpu_line()}; "
                             "TTFT/TPOT measured by the client (openai async client, streaming)."])
    print(text)
    if not args.no_write and not args.smoke:
        append_section("Serving under load (issue 14)", "python benchmarks/serve_load.py", text)


if __name__ == "__main__":
    main()
