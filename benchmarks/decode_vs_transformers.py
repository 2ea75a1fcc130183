"""dsv3 (cpu backend, bf16 activations) against transformers' DeepseekV3ForCausalLM on the same weights, and
against the machine's memory bandwidth.

Side by side in one run, on the ~280M-parameter config (hidden 1024, 8 layers, 32 experts top-4, vocab
32000) written in the released FP8 layout: batch-1 greedy decode tokens/s (transformers' `generate` against
dsv3's generation loop) and prefill tokens/s for a 512-token prompt. dsv3 runs three ways: FP8 weights kept
as FP8 (`--cpu-weights fp8`, the default), dequantized to bf16 at load (`--cpu-weights bf16`), and with the
C kernels off (DSV3_CPU_NATIVE=0: plain torch ops); then batch-16 greedy decode (16 prompts of the same length)
and a 32-token prompt's prefill, FP8 and bf16 weights against transformers. Batch-1 decode reads every active weight once per
token, so beside the ratios: the machine's copy bandwidth (read + write bytes per second of a 1 GiB copy),
each mode's weight bytes per token, the tokens/s those allow, and the fraction reached. Also each mode's
resident weight memory against the checkpoint's tensor bytes, and its logits' error against transformers
in fp32 next to transformers' own bf16 error. Appends the tables to benchmarks/RESULTS.md with the command.

    python benchmarks/decode_vs_transformers.py [--new-tokens 64] [--batch 16] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import results as R  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = R.parser(__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="prompts decoded together in the batched rows")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import DeepseekV3ForCausalLM

    import dsv3
    from dsv3.convert import dequant
    from dsv3.core.generate import generate
    from dsv3.core.model import LatentCache
    from dsv3.engine import resident_bytes
    from dsv3.synthetic import BENCH_280M

    work, fp8_dir = R.bench_checkpoint(args.workdir, "dsv3-bench-")
    bf16_dir = work / "bf16"
    if not (bf16_dir / "config.json").is_file():
        dequant(fp8_dir, bf16_dir, dtype="bf16", quiet=True, force=True)

    modes = {"fp8": dsv3.load(fp8_dir, backend="cpu", dtype="bf16", cpu_weights="fp8"),
             "bf16": dsv3.load(fp8_dir, backend="cpu", dtype="bf16", cpu_weights="bf16")}
    if modes["fp8"].kernels.native is None:
        sys.exit("the cpu backend's native kernels did not build here (see the log); nothing to compare")
    plain = dsv3.load(fp8_dir, backend="cpu", dtype="bf16", cpu_weights="bf16")
    plain.kernels.native = None  # what DSV3_CPU_NATIVE=0 gives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DeepseekV3ForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, BENCH_280M["vocab_size"], (1, args.prompt_len), generator=g)
    long_prompt = torch.randint(2, BENCH_280M["vocab_size"], (1, args.prefill_len), generator=g)
    batch = torch.randint(2, BENCH_280M["vocab_size"], (args.batch, args.prompt_len), generator=g)  # same lengths
    n_new = args.new_tokens

    decode_only = {}  # tok/s of the decode steps alone (the prompt's prefill left out), best interleaved run

    def ours_decode(engine, keep=False):
        out, stats = generate(engine.model, [prompt[0].tolist()], n_new, eos_ids=(), dtype=torch.bfloat16)
        assert len(out[0]) == n_new
        if keep:
            decode_only[id(engine)] = max(decode_only.get(id(engine), 0.0), stats.decode_tps)
        return out[0]

    def theirs_decode():
        with torch.inference_mode():
            out = theirs.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        return out[0, args.prompt_len:].tolist()

    def ours_batch(engine):
        out, _ = generate(engine.model, batch.tolist(), n_new, eos_ids=(), dtype=torch.bfloat16)
        assert all(len(o) == n_new for o in out)

    def theirs_batch():
        with torch.inference_mode():
            theirs.generate(batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=None,
                            pad_token_id=0)

    def ours_prefill(engine, ids=long_prompt):
        """The prompt's forward as generate runs it: a position step read at the last token (the last layer asks
        that token's query only), against transformers' logits_to_keep=1."""
        B, n = ids.shape
        cache = LatentCache.allocate(engine.cfg, len(engine.model.layers), B, n, torch.bfloat16, "cpu")
        with torch.inference_mode():
            engine.model.forward_step(ids, torch.zeros(B, dtype=torch.long), cache, n,
                                      take=torch.full((B,), n - 1))

    def theirs_prefill(ids=long_prompt):
        with torch.inference_mode():
            theirs(ids, use_cache=True, logits_to_keep=1)

    decoders = {"fp8": lambda: ours_decode(modes["fp8"]), "bf16": lambda: ours_decode(modes["bf16"]),
                "plain": lambda: ours_decode(plain), "theirs": theirs_decode}
    for fn in decoders.values():
        fn()  # warm up (and make the absorbed projections, which the bytes below count)
    # interleaved repeats: a slow phase of this shared machine hits all alike, and each run starts with its weights
    # evicted by the other models' (cold, as in a big model that no cache holds)
    times = {k: float("inf") for k in decoders}
    kept = {"fp8": lambda: ours_decode(modes["fp8"], keep=True), "bf16": lambda: ours_decode(modes["bf16"], keep=True)}
    for _ in range(args.repeats):
        for k, fn in decoders.items():
            times[k] = min(times[k], best(kept.get(k, fn), 1))
    tps = {k: n_new / t for k, t in times.items()}
    # then each model on its own, run after run, as one user runs it (what of its weights a cache keeps, it keeps)
    alone = {}
    for k, fn in decoders.items():
        fn()
        alone[k] = n_new / best(fn, args.repeats)
    # prefill interleaved too (each warmed once first): the ratio then compares like phases of the machine
    prefillers = {k: (lambda e=e: ours_prefill(e)) for k, e in modes.items()}
    prefillers["theirs"] = theirs_prefill
    for fn in prefillers.values():
        fn()
    prefill_s = {k: float("inf") for k in prefillers}
    for _ in range(args.repeats + 2):
        for k, fn in prefillers.items():
            prefill_s[k] = min(prefill_s[k], best(fn, 1))
    prefill = {k: args.prefill_len / t for k, t in prefill_s.items()}
    # batched decode and a short prompt's prefill (a chat turn): FP8 and bf16 weights against transformers, interleaved
    batched = {"fp8": lambda: ours_batch(modes["fp8"]), "bf16": lambda: ours_batch(modes["bf16"]), "theirs": theirs_batch}
    shorts = {k: (lambda e=e: ours_prefill(e, prompt)) for k, e in modes.items()}
    shorts["theirs"] = lambda: theirs_prefill(prompt)
    for fn in (*batched.values(), *shorts.values()):
        fn()
    batch_s = {k: float("inf") for k in batched}
    short_s = {k: float("inf") for k in shorts}
    for _ in range(args.repeats):
        for k in batched:
            batch_s[k] = min(batch_s[k], best(batched[k], 1))
            for _ in range(3):
                short_s[k] = min(short_s[k], best(shorts[k], 1))
    batch_tps = {k: args.batch * n_new / t for k, t in batch_s.items()}
    bandwidth = R.copy_bandwidth()

    rows = [
        "| measurement | dsv3, FP8 weights (default) | dsv3, bf16 weights | dsv3, plain torch ops | transformers (bf16) "
        "| dsv3 FP8 / transformers | dsv3 bf16 / transformers |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| batch-1 greedy decode, {args.prompt_len}-token prompt + {n_new} new tokens, models interleaved | "
        f"{tps['fp8']:.1f} tok/s | {tps['bf16']:.1f} tok/s | {tps['plain']:.1f} tok/s | {tps['theirs']:.1f} tok/s | "
        f"**{tps['fp8'] / tps['theirs']:.2f}x** | **{tps['bf16'] / tps['theirs']:.2f}x** |",
        f"| the same, each model run after run | {alone['fp8']:.1f} tok/s | {alone['bf16']:.1f} tok/s | "
        f"{alone['plain']:.1f} tok/s | {alone['theirs']:.1f} tok/s | **{alone['fp8'] / alone['theirs']:.2f}x** | "
        f"**{alone['bf16'] / alone['theirs']:.2f}x** |",
        f"| prefill, {args.prefill_len}-token prompt | {prefill['fp8']:.0f} tok/s | {prefill['bf16']:.0f} tok/s | "
        f"(bf16 path) | {prefill['theirs']:.0f} tok/s | **{prefill['fp8'] / prefill['theirs']:.2f}x** | "
        f"**{prefill['bf16'] / prefill['theirs']:.2f}x** |",
        f"| batch-{args.batch} greedy decode, {args.prompt_len}-token prompts + {n_new} new tokens, models interleaved | "
        f"{batch_tps['fp8']:.1f} tok/s | {batch_tps['bf16']:.1f} tok/s | (not timed) | {batch_tps['theirs']:.1f} tok/s | "
        f"**{batch_tps['fp8'] / batch_tps['theirs']:.2f}x** | **{batch_tps['bf16'] / batch_tps['theirs']:.2f}x** |",
        f"| prefill, {args.prompt_len}-token prompt (time to the first token's logits) | {1e3 * short_s['fp8']:.1f} ms | "
        f"{1e3 * short_s['bf16']:.1f} ms | (not timed) | {1e3 * short_s['theirs']:.1f} ms | "
        f"**{short_s['theirs'] / short_s['fp8']:.2f}x** | **{short_s['theirs'] / short_s['bf16']:.2f}x** |",
        "",
        "| weights | bytes per token | resident weights / the checkpoint's bytes of them | bandwidth limit | decode "
        "steps reached | fraction of the limit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ckpt_all, ckpt_bytes = R.checkpoint_tensor_bytes(fp8_dir)
    for k, engine in modes.items():
        step = R.decode_step_bytes(engine.model)
        held = resident_bytes(engine) + sum(t.numel() * t.element_size() for layer in engine.model.layers
                                            for t in (layer.attn._absorbed or ()))
        limit = bandwidth / step
        steps = decode_only[id(engine)]
        rows.append(f"| {k} | {step / 1e6:.1f} MB | {held / 1e6:.0f} MB / {ckpt_bytes / 1e6:.0f} MB = "
                    f"**{held / ckpt_bytes:.3f}** | {limit:.0f} tok/s | {steps:.1f} tok/s | **{steps / limit:.0%}** |")

    # logits against transformers in fp32, next to transformers' own bf16 error (same prompt, prefill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref32 = DeepseekV3ForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.float32).eval()
    ids = long_prompt[:, :128]
    with torch.inference_mode():
        want = ref32(ids).logits.float()
        peer = theirs(ids).logits.float()
    err = {k: ((e.logits(ids).float() - want).norm() / want.norm()).item() for k, e in modes.items()}
    e_peer = ((peer - want).norm() / want.norm()).item()
    native = modes["fp8"].kernels.native
    notes = [
        f"Resident weights: every tensor the model holds (FP8 weights, their scales, bf16 embedding/head/norms, the "
        f"fp32 gate, the absorbed attention projections made at the first decode step) against the checkpoint's bytes "
        f"of the tensors it loads ({ckpt_bytes / 1e6:.0f} of {ckpt_all / 1e6:.0f} MB: the MTP layer's copies of the "
        "embedding and head are shared with the main model, not loaded).",
        f"Copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write of a 1 GiB copy, best of 5); the bandwidth limit "
        "is that over the weight bytes a batch-1 step reads (every layer's attention and dense/shared weights, the "
        "absorbed projections, 4 of 32 experts per MoE layer, the head); 'decode steps reached' is the best rate of the "
        "decode steps alone (the prompt's prefill left out) in the interleaved runs. Weights in cache can beat the "
        "limit.",
        f"Logits of a 128-token prompt against transformers in fp32: relative error FP8 weights {err['fp8']:.4f}, "
        f"bf16 weights {err['bf16']:.4f}, transformers bf16 {e_peer:.4f} (ratio to it: "
        f"{err['fp8'] / e_peer:.2f}x and {err['bf16'] / e_peer:.2f}x; the bar is 1.5x).",
        "Model: BENCH_280M, written in the released FP8 layout; dsv3 loads the FP8 files (keeping or dequantizing "
        "them), transformers loads `dsv3 convert dequant` output (BF16). Decode tok/s: new tokens over the whole "
        f"generate call (the short prompt's prefill included, for both), best of {args.repeats}, first with the four "
        "models interleaved (each run starts with its weights evicted by the others': the conservative figure, and the "
        "one judged), then each model run after run (its weights partly stay in this machine's large shared L3: a "
        f"280M model can, DeepSeek-V3 cannot); prefill: best of {args.repeats + 2}, the three interleaved, dsv3's as "
        "generate runs it (its last layer asks only the last token's query) against transformers' logits_to_keep=1. "
        "Batched "
        f"decode: {args.batch} prompts of {args.prompt_len} tokens, new tokens of all rows over the whole call, best of "
        f"{args.repeats}; the short prefill best of {3 * args.repeats}; both interleaved, speed-ups as time ratios.",
        f"Machine: {R.cpu_line()}; torch {torch.__version__} with {torch.get_num_threads()} threads; dsv3 C kernels "
        f"built for {native.isa}{' + vbmi (FP8 widened by table)' if native.fp8_table else ''}.",
    ]
    text = "\n".join(rows + [""] + notes)
    print(text)
    if not args.no_write:
        R.append_section("Decode and prefill against transformers (issues 2, 18)",
                       "python benchmarks/decode_vs_transformers.py", text)


if __name__ == "__main__":
    main()
