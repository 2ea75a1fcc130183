"""A speculative round's pieces, shared by `engine.generate`'s loop (speculative.py, which explains the round) and the
server's drafting (serve/speculation.py): the main model's verify step, the MTP module's draft step, a whole greedy
round in one step (verify, acceptance and catch-up, no host read), and the acceptance rules.
"""

from __future__ import annotations

import torch

from .generate import StaticStep, draw, probabilities
from .model import LatentCache, Transformer


def verify_step(model: Transformer, cache: LatentCache, batch: int, q: int, span: int, graphs: bool) -> StaticStep:
    """The main model over q tokens per row at positions length .. length + q - 1 -> logits [B, q, V], hidden [B, q, D]."""
    device = model.rope_cos.device
    buffers = dict(tokens=torch.zeros(batch, q, dtype=torch.long, device=device),
                   positions=torch.full((batch,), span - q, dtype=torch.long, device=device))
    return StaticStep(model, "verify step", lambda tokens, positions: model.forward_step(tokens, positions, cache, span),
                      buffers, graphs)


def draft_step(model: Transformer, cache: LatentCache, batch: int, q: int, span: int, dtype: torch.dtype,
               graphs: bool, every: bool = False) -> StaticStep:
    """The MTP module over q (hidden, next token) pairs per row -> draft logits [B, V] and hidden [B, D] at `take`;
    `every`: at every position, [B, q, V] and [B, q, D] (no `take`: a run of probes scored at once)."""
    device = model.rope_cos.device
    buffers = dict(tokens=torch.zeros(batch, q, dtype=torch.long, device=device),
                   hidden=torch.zeros(batch, q, model.cfg.hidden_size, dtype=dtype, device=device),
                   positions=torch.full((batch,), span - q, dtype=torch.long, device=device))
    if every:
        return StaticStep(model, "probe score step", lambda tokens, hidden, positions: model.mtp_step(
            tokens, hidden, positions, cache, span, take=None), buffers, graphs)
    buffers["take"] = torch.zeros(batch, dtype=torch.long, device=device)
    return StaticStep(model, "draft step", lambda tokens, hidden, positions, take: model.mtp_step(
        tokens, hidden, positions, cache, span, take=take), buffers, graphs)


def greedy_round(model: Transformer, cache: LatentCache, mtp_cache: LatentCache, tokens: torch.Tensor,
                 positions: torch.Tensor, span: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """A whole greedy round on the device, no host read: the main model over tokens [B, q] (x_L and the drafts),
    the drafts it accepts, and the MTP module's catch-up on the kept positions (pairs: the main model's hidden at
    L + j and its choice after it, which for an accepted draft is that draft). -> (draft logits [B, V], choice
    [B, q], accepted [B], draft hidden [B, D], the logits' sum: NaN/Inf shows there). One step to capture and
    one host read per round instead of two steps and several reads (a GPU waits on each read). `rows`: the
    caches' slots (the server's), as forward_step's."""
    logits, hidden = model.forward_step(tokens, positions, cache, span, rows=rows)  # [B, q, V], [B, q, D]
    choice = logits.argmax(dim=-1)  # [B, q]: the main model's token after each fed one
    accepted = (tokens[:, 1:] == choice[:, :-1]).long().cumprod(dim=-1).sum(dim=-1)  # [B]: the leading agreements
    d_logits, d_hidden = model.mtp_step(choice, hidden, positions, mtp_cache, span, take=accepted, rows=rows)
    return d_logits, choice, accepted, d_hidden, logits.sum()


def round_step(model: Transformer, cache: LatentCache, mtp_cache: LatentCache, batch: int, q: int, span: int,
               graphs: bool) -> StaticStep:
    """greedy_round as a static step (the first output, the draft logits, is what a replay is checked by)."""
    device = model.rope_cos.device
    buffers = dict(tokens=torch.zeros(batch, q, dtype=torch.long, device=device),
                   positions=torch.full((batch,), span - q, dtype=torch.long, device=device))
    return StaticStep(model, "round step", lambda tokens, positions: greedy_round(
        model, cache, mtp_cache, tokens, positions, span), buffers, graphs)


def accept_greedy(choice: list[int], drafts: list[int]) -> list[int]:
    """The tokens a greedy row keeps: the drafts the main model agrees with (its choice after each fed token,
    choice [k + 1]), then its own next token."""
    n = 0
    while n < len(drafts) and drafts[n] == choice[n]:
        n += 1
    return drafts[:n] + [choice[n]]


def accept_sampled(p_main: torch.Tensor, drafts: torch.Tensor, p_draft: list[torch.Tensor] | None,
                   generator: torch.Generator | None) -> list[int]:
    """Speculative sampling for one row: p_main [k + 1, V] the main model's distribution after each fed token,
    drafts [k], p_draft the drafter's distributions (None: drafts proposed with certainty). Draft i is kept with
    probability min(1, p/q); the first rejected is replaced by a draw from max(0, p - q), normalized; all kept,
    a draw from the last p_main: the output is distributed as the main model's own."""
    kept = []
    for i in range(drafts.shape[0]):
        d = int(drafts[i])
        p, qd = float(p_main[i, d]), (float(p_draft[i][d]) if p_draft else 1.0)
        if torch.rand((), generator=generator).item() < min(1.0, p / max(qd, 1e-30)):
            kept.append(d)
            continue
        q_dist = p_draft[i] if p_draft else torch.nn.functional.one_hot(drafts[i], p_main.shape[-1]).to(p_main.dtype)
        resid = (p_main[i] - q_dist).clamp(min=0)
        return kept + [int(draw((resid / resid.sum()).unsqueeze(0), generator))]
    return kept + [int(draw(p_main[-1].unsqueeze(0), generator))]


def first_draft_lands(draft_logits: torch.Tensor, logits: torch.Tensor, temperature: float, top_p: float
                      ) -> torch.Tensor:
    """A probe's score per row: would the draft from draft_logits [B, V] be accepted after the main model's logits
    [B, V]? Greedy: 1 where its argmax is the main model's; sampling: the probability a sampled draft is kept,
    sum(min(p_main, p_draft)). -> [B] float."""
    if temperature <= 0:
        return (draft_logits.argmax(dim=-1) == logits.argmax(dim=-1)).float()
    p_main, p_draft = (probabilities(x, temperature, top_p) for x in (logits, draft_logits))
    return torch.minimum(p_main, p_draft).sum(dim=-1)
