"""Sampling and the generation loop over the latent KV cache, on the static decode step.

Prompts of different lengths are right-padded into one batch and prefilled in one forward; each row
then decodes at its own position (the position step of core/model.py), so a batch computes what each
prompt would alone, and padding never enters a row's attention. Every rank runs the same loop; rank
0's sampled tokens are broadcast so all ranks decode the same sequence.

The decode step is shaped by (batch bucket, span) only. Where the backend can capture it
(`Kernels.capture`, CUDA/HIP graphs), it is captured once and replayed every token; elsewhere the same
step runs eagerly. EOS is checked on the host every EOS_CHECK_EVERY tokens, not every step, and the
output is trimmed after.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .errors import DsvError
from .model import LatentCache, Transformer

log = logging.getLogger("dsv3")
EOS_CHECK_EVERY = 16  # a host check per 16 tokens instead of a sync per token


class NonFiniteLogits(DsvError):
    """The forward pass produced NaN/Inf: corrupt weights (or a numerics bug), never a valid answer."""


NAN_PROMPT = ("the model produced NaN/Inf logits for the prompt; the weights are likely corrupt (check them with "
              "`dsv3 convert verify CKPT`)")
NAN_DECODE = ("the model produced NaN/Inf logits while decoding; the weights are likely corrupt (check them with "
              "`dsv3 convert verify CKPT`) or the activations overflow this dtype")


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def line(self) -> str:
        text = (f"prefill: {self.prefill_tokens} tokens in {self.prefill_s:.3f}s ({self.prefill_tps:.1f} tok/s) | "
                f"decode: {self.decode_tokens} tokens in {self.decode_s:.3f}s ({self.decode_tps:.1f} tok/s)")
        if "acceptance" in self.extra:
            x = self.extra
            text += f" | mtp: {x['draft_tokens']} draft(s)/step, acceptance {x['acceptance']:.0%}"
            if x.get("rounds", 1) == 0:  # the probes saw no draft land: no round was run
                n = x.get("probes", 0)
                text += f", drafting stopped after {n} probe{'' if n == 1 else 's'} (no draft would have landed)"
            else:
                text += f", {x['tokens_per_round']:.2f} tokens/step" + ("" if x["drafting_at_end"] else
                                                                        ", drafting stopped (below break-even)")
        return text


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / T) restricted to the smallest top-p nucleus, [.., V],
    normalized (speculative decoding compares the main model's with the drafter's)."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the token that crosses top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [B, V] (on the CPU: a seeded generator gives the same draw on every device)."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B]. temperature 0 is greedy; top_p keeps the smallest nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return draw(probabilities(logits, temperature, top_p), generator)


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """A device bool: t holds no NaN or Inf. One reduction: a NaN or an Inf makes the sum NaN or Inf, while finite
    logits cannot sum past fp32's range (isfinite(t).all() is two passes and a [.., V] bool tensor: ~0.7 ms per
    step at V3's 129k vocabulary and batch 4 on a CPU, the sum ~0.02)."""
    return torch.isfinite(t.sum())


def bucket(batch: int) -> int:
    """The graph batch sizes: 1, 2, 4, 8, then multiples of 8 (a batch is padded up to its bucket)."""
    for b in (1, 2, 4, 8):
        if batch <= b:
            return b
    return -(-batch // 8) * 8


def replay_agrees(kernels, what: str, graph: torch.Tensor, eager: torch.Tensor) -> bool:
    """A captured step's first replay against the eager step's logits (bf16 rounding allowed); logs a disagreement."""
    err = ((graph - eager).abs().max() / eager.abs().max().clamp(min=1e-30)).item()
    if err <= 2e-2:
        return True
    log.warning("%s: the captured %s disagrees with the eager one (max error %.2e); running eagerly", kernels.name,
                what, err)
    return False


class StepPool:
    """Captured steps and the caches they are bound to, kept from one call to the next: a call of the same shape
    (the same batch bucket, span and dtype) replays what an earlier one captured instead of capturing again (on the
    cpu a capture costs about four steps, ~30 ms on the 280M model; a GPU graph more). `keep` shapes at most, the
    least recently used dropped first, before the new shape's caches are allocated, so a call never holds more
    than `keep` - 1 old shapes beside its own. The steps read the weights they were captured with: whoever
    replaces a weight tensor (not in place) calls `clear()`."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.shapes: dict[tuple, dict] = {}

    def take(self, shape: tuple) -> dict:
        """The items kept for this shape (a new empty dict the first time): the caller fills it."""
        items = self.shapes.pop(shape, None)
        if items is None:
            while len(self.shapes) >= self.keep:
                self.shapes.pop(next(iter(self.shapes)))  # the oldest; its tensors go before the new ones come
            items = {}
        self.shapes[shape] = items  # most recent last
        return items

    def clear(self) -> None:
        self.shapes.clear()


class StaticStep:
    """A step of static shapes: inputs staged in fixed buffers (updated in place), the output read from the step's
    own buffers, so the backend may capture it like the decode step (a graph on cuda/rocm, a recorded step on cpu)
    and replay it per round; elsewhere, or when capture fails, it runs eagerly. The first replay is checked against
    the eager step (same writes, so harmless). `run(**buffers)` is the step; `buffers` its inputs, whose values at
    construction are what the capture's warm-up runs see, so they must write where no query reads: positions at
    the end of the span, which a round overwrites before anything reads them, or a scratch slot (the server's)."""

    def __init__(self, model: Transformer, what: str, run, buffers: dict[str, torch.Tensor], graphs: bool):
        self.model, self.what, self.run, self.buffers = model, what, run, buffers
        self.replay, self.out, self.checked = None, None, False
        if graphs and model.kernels.can_capture() and model.par.world_size == 1:
            captured = model.kernels.capture(self._run)
            if captured is not None:
                self.replay, self.out = captured

    def _run(self):
        return self.run(**self.buffers)

    @property
    def captured(self) -> bool:
        return self.replay is not None

    def __call__(self, **values: torch.Tensor):
        """Stage the values (the first rows of each buffer: a batch may fill part of its bucket) and run."""
        for name, value in values.items():
            self.buffers[name][:value.shape[0]].copy_(value)
        if self.replay is None:
            return self._run()
        self.replay()
        if not self.checked:
            self.checked = True
            graph = self.out[0].clone()  # the eager run below writes the same buffers a replay reads back
            eager = self._run()
            if not replay_agrees(self.model.kernels, self.what, graph, eager[0]):
                self.replay = None
                return eager
        return self.out


class DecodeStep(StaticStep):
    """The decode step of one batch: tokens [Bb, 1] and positions [Bb] staged in static buffers, (logits [B, V],
    final hidden [B, D]) read after each call (the hidden is what the MTP drafter reads). `span` fixed (a static
    step, capturable) or None (eager: each call reads only as far as the longest row needs, the fastest where
    nothing is captured). Rows beyond the real batch are padding with their own cache rows: computed, never read."""

    def __init__(self, model: Transformer, cache: LatentCache, batch: int, span: int | None, graphs: bool):
        device = model.rope_cos.device
        rows = cache.kv.shape[1]
        # capture runs the step (warm-ups): at the last position, which no query sees before it is written
        buffers = dict(tokens=torch.zeros(rows, 1, dtype=torch.long, device=device),
                       positions=torch.full((rows,), (span or 1) - 1, dtype=torch.long, device=device))
        self.cache, self.span, self.batch = cache, span, batch
        super().__init__(model, "decode step", self._forward, buffers, graphs and span is not None)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int | None = None):
        logits, hidden = self.model.forward_step(tokens, positions, self.cache, self.span or longest)
        return logits[:, 0], hidden[:, 0]  # [Bb, V], [Bb, D]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B], positions [B] (device) -> logits [B, V], hidden [B, D]. `longest`: the host's bound on
        positions + 1."""
        if self.span is None:  # eager: no static buffers to stage the inputs in
            return self._forward(tokens[:, None], positions, longest)
        logits, hidden = super().__call__(tokens=tokens[:, None], positions=positions)
        return logits[:self.batch], hidden[:self.batch]


def decode_tokens(model: Transformer, decode: DecodeStep, logits: torch.Tensor, pos: torch.Tensor, top: int,
                  count: int, temperature: float, top_p: float, generator: torch.Generator | None,
                  eos: torch.Tensor, done: torch.Tensor, stats: Stats,
                  cap: torch.Tensor | None = None, constrain=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode loop: up to `count` tokens per row, the first sampled from logits [B, V], each fed back through
    `decode` at pos [B] (advanced in place, never past `cap` [B] if given: a row that needs fewer tokens than the
    others then rewrites one entry past its answer instead of running off its cache; `top` = the largest position,
    known on the host). Stops early once every row has an EOS (`eos` ids; `done` [B] the rows finished already),
    checked every EOS_CHECK_EVERY tokens. `constrain(logits [B, V], tokens so far [B, i]) -> logits` masks what
    each row may sample next (a grammar: it reads the tokens on the host, one sync a token).
    -> tokens [B, n] (rows run on past their EOS: the caller trims) and a device bool: every logit was finite."""
    B = logits.shape[0]
    out = torch.empty(B, count, dtype=torch.long, device=logits.device)
    finite = torch.ones((), dtype=torch.bool, device=logits.device)
    n = 0
    for i in range(count):
        if constrain is not None:
            logits = constrain(logits, out[:, :i])
        nxt = model.par.broadcast(sample(logits, temperature, top_p, generator))  # [B]
        out[:, i] = nxt
        done |= torch.isin(nxt, eos)
        n = i + 1
        stats.steps += 1
        if i == count - 1 or (n % EOS_CHECK_EVERY == 0 and bool(done.all())):
            break
        logits = decode(nxt, pos, top + i + 1)[0]
        finite &= all_finite(logits)  # on the device: checked once, after the loop
        pos += 1
        if cap is not None:
            torch.minimum(pos, cap, out=pos)
    return out[:, :n], finite


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_ids: tuple[int, ...] = (), seed: int | None = None,
             dtype: torch.dtype | None = None, pad_id: int = 0, graphs: bool = True,
             static: bool = False, pool: StepPool | None = None, constrain=None) -> tuple[list[list[int]], Stats]:
    """New tokens for each prompt (EOS excluded), and timings. `graphs`: capture the decode step where the
    backend can; `static`: run the capturable (fixed-span) step even where nothing is captured (tests);
    `pool`: where a static step and its cache are kept for the next call of the same shape; `constrain`: a
    grammar's masks (decode_tokens)."""
    par, device = model.par, model.rope_cos.device
    stats = Stats()
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    if min(lengths) == 0:
        raise ValueError("empty prompt")
    total = L + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.max_seq_len}")
    why = model.kernels.capture_unavailable()
    if why is None and par.world_size > 1:
        # a rank whose capture failed would run eagerly while the others wait inside a captured collective
        why = "graph capture is off under tensor parallel (collectives inside a graph are not validated yet)"
    if graphs and why is not None and not model.kernels.said_no_capture:
        model.kernels.said_no_capture = True
        log.info("%s; the same static step runs without a graph", why)
    fixed = static or (graphs and why is None)
    rows = bucket(B) if fixed else B
    tokens = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)  # right-padded: each row starts at position 0
    length = torch.tensor(lengths, device=device)
    dtype = dtype or model.embed.weight.dtype
    # a kept step's cache holds an earlier call's entries: past each row's length, so never read (DESIGN.md, "Rollback")
    kept = pool.take(("decode", rows, total, dtype, graphs)) if pool is not None and fixed else {}
    if "cache" not in kept:
        kept["cache"] = LatentCache.allocate(model.cfg, len(model.layers), rows, total, dtype, device)
    cache = kept["cache"]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_ids) or [-1], device=device)

    t0 = time.perf_counter()
    if "step" not in kept:  # captured before the cache holds anything
        kept["step"] = DecodeStep(model, cache, B, total if fixed else None, graphs)
    decode = kept["step"]
    decode.batch = B  # a kept step serves any batch of its bucket
    stats.extra["capture_s"] = time.perf_counter() - t0
    stats.extra["decode_step"] = "graph" if decode.captured else "static" if fixed else "eager"

    t0 = time.perf_counter()
    logits, _ = model.forward_step(tokens, torch.zeros(B, dtype=torch.long, device=device), cache, L, take=length - 1)
    stats.prefill_tokens, stats.prefill_s = sum(lengths), time.perf_counter() - t0
    if not bool(all_finite(logits)):  # corrupt weights: say so rather than print noise
        raise NonFiniteLogits(NAN_PROMPT)

    t0 = time.perf_counter()
    out, finite = decode_tokens(model, decode, logits, length.clone(), L, max_new_tokens, temperature, top_p,
                                generator, eos, torch.zeros(B, dtype=torch.bool, device=device), stats,
                                constrain=constrain)
    stats.decode_s = time.perf_counter() - t0
    stats.extra["decode_step"] = "graph" if decode.captured else "static" if fixed else "eager"  # after a fallback too
    if not bool(finite):
        raise NonFiniteLogits(NAN_DECODE)
    results = []
    for row in out.tolist():
        cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:cut])
    stats.decode_tokens = sum(len(r) for r in results)
    return results, stats
