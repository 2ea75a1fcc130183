"""Sampling and the generation loop over the latent KV cache.

Prompts of different lengths are left-padded into one batch; the model masks the padding and
starts each sequence's positions at its first real token, so a batch computes what each prompt
would alone. Every rank runs the same loop; rank 0's sampled tokens are broadcast so all ranks
decode the same sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import DsvError
from .model import LatentCache, Transformer


class NonFiniteLogits(DsvError):
    """The forward pass produced NaN/Inf: corrupt weights (or a numerics bug), never a valid answer."""


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
        return (f"prefill: {self.prefill_tokens} tokens in {self.prefill_s:.3f}s ({self.prefill_tps:.1f} tok/s) | "
                f"decode: {self.decode_tokens} tokens in {self.decode_s:.3f}s ({self.decode_tps:.1f} tok/s)")


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B]. temperature 0 is greedy; top_p keeps the smallest nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the token that crosses top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_ids: tuple[int, ...] = (), seed: int | None = None,
             dtype: torch.dtype | None = None, pad_id: int = 0) -> tuple[list[list[int]], Stats]:
    """New tokens for each prompt (EOS excluded), and timings."""
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
    tokens = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([L - n for n in lengths], device=device) if min(lengths) != L else None
    dtype = dtype or model.embed.weight.dtype
    cache = LatentCache.allocate(model.cfg, len(model.layers), B, total, dtype, device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_ids) or [-1], device=device)

    t0 = time.perf_counter()
    logits = model(tokens, 0, cache, pad, last_only=True)[:, -1]  # [B, V]
    stats.prefill_tokens, stats.prefill_s = sum(lengths), time.perf_counter() - t0
    if not bool(torch.isfinite(logits).all()):  # corrupt weights: say so rather than print noise
        raise NonFiniteLogits("the model produced NaN/Inf logits for the prompt; the weights are likely corrupt "
                              "(check them with `dsv3 convert verify CKPT`)")

    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        nxt = par.broadcast(sample(logits, temperature, top_p, generator))  # [B]
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, eos)
        stats.steps += 1
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], L + i, cache, pad, last_only=True)[:, -1]
        finite &= torch.isfinite(logits).all()  # on the device: checked once, after the loop
    stats.decode_s = time.perf_counter() - t0
    if not bool(finite):
        raise NonFiniteLogits("the model produced NaN/Inf logits while decoding; the weights are likely corrupt "
                              "(check them with `dsv3 convert verify CKPT`) or the activations overflow this dtype")
    results = []
    for row in out.tolist():
        cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:cut])
    stats.decode_tokens = sum(len(r) for r in results)
    return results, stats
