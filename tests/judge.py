"""How the backends are judged: the same bar and the same generation checks for every backend."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def miss_rate(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.argmax(-1) != ref.argmax(-1)).float().mean().item()


def assert_no_worse(ours: torch.Tensor, peer: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Relative error and top-1 miss rate against `ref` at most 1.5x the peer's. A miss rate counts
    whole positions, so the allowance is rounded up to one position."""
    assert not ours.isnan().any(), f"{what}: NaN logits"
    e_ours, e_peer, m_ours, m_peer = rel_err(ours, ref), rel_err(peer, ref), miss_rate(ours, ref), miss_rate(peer, ref)
    print(f"{what}: rel err {e_ours:.4f} (peer {e_peer:.4f}), top-1 miss {m_ours:.4f} (peer {m_peer:.4f})")
    assert e_ours <= 1.5 * e_peer, f"{what}: relative error {e_ours:.3e} vs the peer's {e_peer:.3e}"
    positions = ref.shape[:-1].numel()
    assert m_ours <= max(1.5 * m_peer, 1 / positions) + 1e-9, f"{what}: top-1 miss {m_ours:.4f} vs the peer's {m_peer:.4f}"


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
