"""How the backends are judged: the same bar and the same generation checks for every backend."""

from __future__ import annotations

import math

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def miss_rate(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.argmax(-1) != ref.argmax(-1)).float().mean().item()


RATIO = 1.5  # "no worse": at most 1.5x the peer's error
ALPHA = 1e-3  # the chance that a backend exactly as good as that fails the miss-count test


def miss_p_value(k_ours: int, k_peer: int, ratio: float = RATIO) -> float:
    """P(X >= k_ours) for X ~ Binomial(k_ours + k_peer, ratio / (1 + ratio)).

    Top-1 misses are rare events, so each side's count is ~Poisson; given the total, our share is
    binomial, with p = ratio / (1 + ratio) when our miss rate is exactly `ratio` times the peer's
    (the conditional test for a ratio of two Poisson rates). A small p-value means we are worse
    than `ratio` beyond what chance explains; one routing flip among a handful of misses is not.
    """
    n, p = k_ours + k_peer, ratio / (1 + ratio)
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k_ours, n + 1))


def assert_no_worse(ours: torch.Tensor, peer: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Relative error at most 1.5x the peer's, and a top-1 miss count not significantly above 1.5x the
    peer's (see miss_p_value): bf16 routing flips on near-ties, which differ between CPUs (AVX2 and
    AMX round bf16 differently), move a few positions either way."""
    assert not ours.isnan().any(), f"{what}: NaN logits"
    e_ours, e_peer, m_ours, m_peer = rel_err(ours, ref), rel_err(peer, ref), miss_rate(ours, ref), miss_rate(peer, ref)
    positions = ref.shape[:-1].numel()
    k_ours, k_peer = round(m_ours * positions), round(m_peer * positions)
    pv = miss_p_value(k_ours, k_peer)
    print(f"{what}: rel err {e_ours:.4f} (peer {e_peer:.4f}), top-1 misses {k_ours} (peer {k_peer}) of {positions}, "
          f"p={pv:.3g}")
    assert e_ours <= RATIO * e_peer, f"{what}: relative error {e_ours:.3e} vs the peer's {e_peer:.3e}"
    assert pv >= ALPHA, (f"{what}: {k_ours} top-1 misses vs the peer's {k_peer} of {positions} positions: p={pv:.2e} "
                         f"< {ALPHA} that a backend with {RATIO}x the peer's miss rate does this badly")


def assert_generation_path(engine, max_new_tokens: int = 3) -> None:
    """Cached greedy decode picks exactly the argmax of a cache-free forward, and a left-padded batch
    of prompts of different lengths gives what each prompt gives alone."""
    prompts = [[5, 9, 200, 17, 3, 88], [300, 2, 77]]
    alone = [engine.generate([p], max_new_tokens=max_new_tokens)[0] for p in prompts]
    assert engine.generate(prompts, max_new_tokens=max_new_tokens) == alone
    seq = list(prompts[0])
    for tok in alone[0]:
        assert int(engine.logits([seq])[0, -1].argmax()) == tok
        seq.append(tok)
