"""Log-probability entries as the OpenAI API reports them: the model's own distribution (fp32 log-softmax of its
logits, before temperature, top_p or any logit shaping), the chosen token's and the most likely alternatives."""

from __future__ import annotations

import torch


def logprob_entries(logits: torch.Tensor, tokens: list[int], top: int) -> list[tuple]:
    """logits [n, V] and the token chosen at each of the n positions -> [(token, its log-probability, [(id,
    log-probability)] of the `top` most likely)] under the model's distribution (fp32 log-softmax)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).view(-1, 1))[:, 0].tolist()
    alts = [[] for _ in tokens]
    if top > 0:
        v, i = lp.topk(top, dim=-1)
        alts = [list(zip(ids, vals)) for ids, vals in zip(i.tolist(), v.tolist())]
    return [(t, c, a) for t, c, a in zip(tokens, chosen, alts)]


def entries(logits: torch.Tensor, asked: list[tuple]) -> dict:
    """Logprob entries {key: entry} for (key, row of logits [n, V], token, alternatives) tuples: one log-softmax
    for them all, each keeping its own number of alternatives."""
    if not asked:
        return {}
    made = logprob_entries(logits[[i for _, i, _, _ in asked]], [t for _, _, t, _ in asked], max(a[3] for a in asked))
    return {key: (t, c, alts[:top]) for (key, _, _, top), (t, c, alts) in zip(asked, made)}
