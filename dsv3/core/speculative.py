"""Speculative decoding with the MTP module as the drafter (DeepSeek-V3's own multi-token prediction).

Each round, row by row at its own position L (tokens 0..L-1 in the main cache, x_L chosen, not yet fed):
1. draft: the MTP module drafts d_1 from (main hidden at L-1, x_L); chained through the same module on its
   own output, d_2 .. d_k (`draft_tokens` = k);
2. verify: one main-model step over [x_L, d_1 .. d_k] at positions L .. L+k (q = 1 + k) gives the main
   model's choice y_1 .. y_{k+1} after each;
3. accept the longest prefix with d_i = y_i (greedy) or by rejection sampling (temperature > 0: accept d_i
   with probability min(1, p/q), on rejection sample from max(0, p - q)), then the main model's own next
   token: n + 1 new tokens per round, n = accepted drafts;
4. catch up: the MTP cache gets the pairs (hidden at t, token t+1) for the n + 1 new positions.
Rollback is a length: cache entries past a row's length (a rejected draft's, a chained draft's) are never
visible, and the next round overwrites them before anything reads them (DESIGN.md, "Rollback").

Greedy output equals plain greedy decoding token for token; sampled output has the main model's
distribution (the standard speculative-sampling argument).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from .errors import DsvError
from .generate import (
    NAN_DECODE,
    NAN_PROMPT,
    DecodeStep,
    NonFiniteLogits,
    StaticStep,
    Stats,
    StepPool,
    all_finite,
    decode_tokens,
    draw,
    probabilities,
    sample,
)
from .model import LatentCache, Transformer

log = logging.getLogger("dsv3")
#: adaptive mode: this many drafting rounds, then this many plain steps, both timed; the faster one goes on.
#: Before the rounds, the MTP drafter is probed on plain steps; if none of its drafts would have landed in QUIT_AFTER
#: probes, drafting stops at once (a drafter with the 85% acceptance of DeepSeek-V3's report misses its first
#: draft three times running once in ~300 runs: 0.15^3). A substituted drafter (tests) is judged the same way on
#: its first QUIT_AFTER rounds.
JUDGE_AFTER, QUIT_AFTER = 4, 3
#: the rounds stop before JUDGE_AFTER once the drafts landed so far make the break-even acceptance implausible (as
#: few landing at that acceptance has a chance below STOP_P): a drafter far below break-even costs ~2 rounds, not 4
STOP_P = 0.01
#: a step shape (verify or draft, q tokens per row) is captured once it has run this many times. At once: a capture
#: costs about what the eager runs it would wait through cost (cpu: one recorded run and one check; a GPU: two warm-up
#: runs), and the rounds that follow replay it (measured on the cpu at 64 new tokens: 3 eager rounds first cost the
#: perfect-draft run ~20% of its speed)
CAPTURE_AFTER = 0


def verify_step(model: Transformer, cache: LatentCache, batch: int, q: int, span: int, graphs: bool) -> StaticStep:
    """The main model over q tokens per row at positions length .. length + q - 1 -> logits [B, q, V], hidden [B, q, D]."""
    device = model.rope_cos.device
    buffers = dict(tokens=torch.zeros(batch, q, dtype=torch.long, device=device),
                   positions=torch.full((batch,), span - q, dtype=torch.long, device=device))
    return StaticStep(model, "verify step", lambda tokens, positions: model.forward_step(tokens, positions, cache, span),
                      buffers, graphs)


def draft_step(model: Transformer, cache: LatentCache, batch: int, q: int, span: int, dtype: torch.dtype,
               graphs: bool) -> StaticStep:
    """The MTP module over q (hidden, next token) pairs per row -> draft logits [B, V] and hidden [B, D] at `take`."""
    device = model.rope_cos.device
    buffers = dict(tokens=torch.zeros(batch, q, dtype=torch.long, device=device),
                   hidden=torch.zeros(batch, q, model.cfg.hidden_size, dtype=dtype, device=device),
                   positions=torch.full((batch,), span - q, dtype=torch.long, device=device),
                   take=torch.zeros(batch, dtype=torch.long, device=device))
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


def _worth_capturing(decided: bool, accepted: int) -> bool:
    """While the adaptive mode still judges, capture only once a draft has landed: drafts that never land stop
    after QUIT_AFTER probes (or rounds, for a substituted drafter), and captures for those would cost more than
    they save."""
    return decided or accepted > 0


def _keep_drafting(rate: dict[bool, float]) -> bool:
    """The adaptive decision: tokens/s while drafting (True) against plain steps (False)."""
    return rate[True] > rate[False]


def _start_drafting(hits: float) -> bool:
    """After a probe: whether the drafts seen so far landed often enough to try drafting rounds (greedy: one draft
    that equals the main model's token; sampling: the probability that a sampled draft is kept sums to 1/2)."""
    return hits >= 0.5


def _cannot_pay(step_ratio: float, k: int, landed: float, tried: int) -> bool:
    """Whether drafting is hopeless. A round costs `step_ratio` plain steps, so it must keep step_ratio - 1 drafts
    on average; chained drafts whose first lands with probability a keep a + a^2 + ... + a^k. True when no a in
    [0, 1] reaches that, or when `landed` of `tried` first drafts (probes' and rounds') would happen with a chance
    below STOP_P at the a that just does (a binomial tail)."""
    need = step_ratio - 1
    if need <= 0 or tried == 0:
        return False
    if need >= k:
        return True
    lo, hi = 0.0, 1.0
    for _ in range(40):  # the break-even a, by bisection (the kept count grows with a)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** i for i in range(1, k + 1)) < need else (lo, mid)
    a = hi
    tail = sum(math.comb(tried, i) * a ** i * (1 - a) ** (tried - i) for i in range(int(landed) + 1))
    return tail < STOP_P


def plain_step(model: Transformer, kept: dict, cache: LatentCache, B: int, total: int, graphs: bool,
               capture_s: list[float]) -> DecodeStep:
    """generate's decode step over the main cache (logits and the hidden the drafter reads), made once and kept."""
    if "plain" not in kept:
        t = time.perf_counter()
        kept["plain"] = DecodeStep(model, cache, B, total, graphs=graphs)
        capture_s[0] += time.perf_counter() - t
    return kept["plain"]


def plain_tail(model: Transformer, kept: dict, cache: LatentCache, B: int, total: int, graphs: bool,
               last: torch.Tensor, length: torch.Tensor, active: list[int], out: list[list[int]], done: list[bool],
               max_new_tokens: int, temperature: float, top_p: float, generator: torch.Generator | None,
               eos: set[int], eos_t: torch.Tensor, stats: Stats, capture_s: list[float]) -> torch.Tensor:
    """Once drafting has stopped for good: the rest of the answer through generate's own decode loop on the plain
    decode step (captured where the backend can, kept in `kept`), so a run that gave up drafting decodes as fast as
    one that never drafted (a round's host bookkeeping costs ~0.3 ms, a plain loop's far less). Rows not in
    `active` stay frozen at their length; the others write at most the tokens they still need. Appends to `out`;
    -> the new lengths [B]."""
    decode = plain_step(model, kept, cache, B, total, graphs, capture_s)
    need = [max_new_tokens - len(out[b]) if b in active else 0 for b in range(B)]
    cap = length + torch.tensor(need, device=length.device)  # [B] past each row's answer: never read
    top = int(length.max())
    logits, _ = decode(last, length, top + 1)  # x_L, chosen last round, into the cache
    pos = torch.minimum(length + 1, cap)
    finished = torch.tensor([b not in active for b in range(B)], device=length.device)
    tokens, finite = decode_tokens(model, decode, logits, pos, top + 1, max(need), temperature, top_p, generator,
                                   eos_t, finished, stats, cap=cap)
    if not bool(finite & all_finite(logits)):
        raise NonFiniteLogits(NAN_DECODE)
    for b, row in zip(active, tokens[active].tolist()):
        for t in row:
            out[b].append(t)
            if t in eos or len(out[b]) >= max_new_tokens:
                break
        done[b] = True
    return pos


@torch.inference_mode()
def speculative_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, draft_tokens: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, eos_ids: tuple[int, ...] = (),
                         seed: int | None = None, dtype: torch.dtype | None = None, drafter=None,
                         adaptive: bool | None = None, keep: dict | None = None, graphs: bool = True,
                         pool: StepPool | None = None) -> tuple[list[list[int]], Stats]:
    """New tokens per prompt (EOS excluded) and stats (acceptance in stats.extra). `drafter(rows, lengths, drafts)`,
    if given, replaces the MTP module's drafts (tests: perfect or always-wrong drafts); it returns [B, k] ids.
    `adaptive`: probe the drafter on plain steps until a draft would have landed (none in QUIT_AFTER: drafting
    stops), then time JUDGE_AFTER drafting rounds and JUDGE_AFTER plain steps and go on with the faster (drafts
    that rarely land cost a verify and a draft per token; where that is, speculation turns itself off); None: on
    unless a `drafter` is given (substituted drafts are for tests that want every round to draft).
    `keep`, if given, receives the final caches and per-row lengths (tests check them against a plain run).
    Once drafting has stopped for good, the rest decodes through generate's loop (`plain_tail`). `pool`: where the
    caches and captured steps are kept for the next call of the same shape."""
    if len(model.mtp) == 0 and drafter is None:
        raise DsvError("speculative decoding needs the checkpoint's MTP layer (num_nextn_predict_layers >= 1, "
                       "loaded with with_mtp=True); run without --speculative")
    if draft_tokens < 1:
        raise DsvError(f"draft_tokens={draft_tokens}; give at least 1")
    device, k, par = model.rope_cos.device, draft_tokens, model.par

    def agreed(flag: bool) -> bool:
        """Under tensor parallel every rank runs this loop; what it decides on the host (timings, draws) is rank
        0's, so the ranks run the same steps."""
        return bool(par.broadcast(torch.tensor([int(flag)], device=device))) if par.world_size > 1 else flag
    stats = Stats()
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("empty prompt")
    L = max(lengths)
    total = L + max_new_tokens + 2 * k + 2  # a round writes k + 1 entries past a row's length, which may pass the cut
    if total > model.max_seq_len:
        raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) + {k + 1} draft positions exceeds "
                         f"max_seq_len={model.max_seq_len}")
    dtype = dtype or model.embed.weight.dtype
    # kept caches hold an earlier call's entries, all past this call's lengths until it writes them: never read
    kept = pool.take(("speculative", B, total, dtype, graphs)) if pool is not None else {}
    if "cache" not in kept:
        kept["cache"] = LatentCache.allocate(model.cfg, len(model.layers), B, total, dtype, device)
        kept["mtp_cache"] = LatentCache.allocate(model.cfg, 1, B, total, dtype, device) if len(model.mtp) else None
    cache, mtp_cache = kept["cache"], kept["mtp_cache"]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    greedy = temperature <= 0

    # ---- prefill: the main model over the prompts, then the MTP module over the same positions
    t0 = time.perf_counter()
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    length = torch.tensor(lengths, device=device)  # [B] entries of each row's main cache
    zero = torch.zeros(B, dtype=torch.long, device=device)
    logits, hidden = model.forward_step(tokens, zero, cache, L, take=length - 1, all_hidden=True)  # hidden [B, L, D]
    if not bool(all_finite(logits)):
        raise NonFiniteLogits(NAN_PROMPT)
    last = par.broadcast(sample(logits, temperature, top_p, generator))  # [B] x_L: chosen, not yet in the cache
    out: list[list[int]] = [[int(t)] for t in last.tolist()]
    rows = torch.arange(B, device=device)
    draft_h, draft_logits = None, None
    if mtp_cache is not None:
        nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # the token after each position ...
        nxt[rows, length - 1] = last  # ... and x_L after the last one
        draft_logits, draft_h = model.mtp_step(nxt, hidden, zero, mtp_cache, L, take=length - 1)
    stats.prefill_tokens, stats.prefill_s = sum(lengths), time.perf_counter() - t0  # the MTP module's prefill too

    t0 = time.perf_counter()
    eos = set(eos_ids)
    eos_t = torch.tensor(list(eos_ids) or [-1], device=device)
    done = [out[b][0] in eos for b in range(B)]
    # the host's copies of each row's cache length and last token, so a round spends few small ops on bookkeeping
    # (each costs ~20-60 us on a cpu right after a step: ~0.5 ms a round, 5% of a step, before these)
    lens, lasts = list(lengths), [o[0] for o in out]
    sums: list[torch.Tensor] = []  # each step's logits summed: NaN/Inf checked once, after the loop
    no_drafts = torch.zeros(0, dtype=torch.long, device=device)
    proposed = accepted = rounds = row_rounds = probes = probed = 0
    hits = 0.0  # drafts that would have landed in the probes (sampling: the probability they would have)
    drafting, decided = True, not (adaptive if adaptive is not None else drafter is None)
    # adaptive with the MTP drafter: first probe, plain steps whose token is compared with the draft the MTP module
    # would have fed. The first is scored at once (the prefill left the drafts' logits); the module catches up on the
    # next ones in one call when they are QUIT_AFTER, which scores them all: a drafter that never lands costs one
    # eager MTP call over the probes (~1 MTP step), not one per probe (2-3 plain steps' time each on a small model)
    probing = not decided and drafter is None and mtp_cache is not None
    # drafting or not: each timed round's (plain step's) seconds, and the tokens they gained; probes are plain steps
    took: dict[bool, list[float]] = {True: [], False: []}
    gained = {True: 0, False: 0}
    firsts = 0  # rounds (per row) whose first draft landed
    # plain steps the MTP cache has not caught up on (probes, timed plain steps): (hidden [B, 1, D], token [B]) each,
    # the first at positions pending_at [B]; and the probes that wait for it to be scored: (index in pending, rows,
    # the main model's logits [B, V])
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    unscored: list[tuple[int, list[int], torch.Tensor]] = []
    pending_at, trial = length, 0  # trial: plain steps timed so far
    # static steps per (kind, q), captured once a shape has run CAPTURE_AFTER times and is worth it (_worth_capturing):
    # the verify step (q = 1 + k) and the MTP catch-up (q = 1 + k, or 1 after a first probe that landed); the plain
    # steps (q = 1) are generate's decode step (plain_step)
    static: dict[tuple[str, int], StaticStep] = kept.setdefault("static", {})
    uses: dict[tuple[str, int], int] = {}

    # static steps made so far (a round that made one is not timed: a one-off cost, not its speed) and the seconds
    # their captures took, kept out of decode_s as generate() keeps its decode step's capture out
    captures, capture_s = [0], [0.0]

    def static_step(kind: str, q: int) -> StaticStep | None:
        uses[kind, q] = uses.get((kind, q), 0) + 1
        if (kind, q) not in static and uses[kind, q] > CAPTURE_AFTER and _worth_capturing(decided, accepted + hits):
            t = time.perf_counter()
            static[kind, q] = (verify_step(model, cache, B, q, total, graphs) if kind == "verify" else
                               round_step(model, cache, mtp_cache, B, q, total, graphs) if kind == "round" else
                               draft_step(model, mtp_cache, B, q, total, dtype, graphs))
            captures[0] += 1
            capture_s[0] += time.perf_counter() - t
        return static.get((kind, q))

    def catch_up(score: bool) -> float:
        """The MTP module over the pending pairs in one call -> its drafts' logits and hidden for the next round;
        `score`: at every position, so each waiting probe is scored against the draft of the position before it
        -> the probability mass of those that would have landed."""
        nonlocal draft_logits, draft_h, probed
        J, landed = len(pending), 0.0
        h = torch.cat([p[0] for p in pending], dim=1)  # [B, J, D]
        toks = torch.stack([p[1] for p in pending], dim=1)  # [B, J]
        span = int(pending_at.max()) + J
        if score:
            dl, dh = model.mtp_step(toks, h, pending_at, mtp_cache, span, take=None)  # [B, J, V], [B, J, D]
            for i, scored, main in unscored:
                landed += float(first_draft_lands(dl[scored, i - 1], main[scored], temperature, top_p).sum())
                probed += len(scored)
            draft_logits, draft_h = dl[:, -1], dh[:, -1]
        elif J == 1 and (step := static_step("draft", 1)) is not None:  # the first probe landed: the usual start
            draft_logits, draft_h = step(tokens=toks, hidden=h, positions=pending_at, take=zero)
        else:
            draft_logits, draft_h = model.mtp_step(toks, h, pending_at, mtp_cache, span,
                                                   take=torch.full_like(zero, J - 1))
        pending.clear()
        unscored.clear()
        return landed
    while True:
        active = [b for b in range(B) if not done[b] and len(out[b]) < max_new_tokens]
        if not active:
            break
        if decided and not drafting:  # drafting stopped for good: generate's loop on the plain decode step
            length = plain_tail(model, kept, cache, B, total, graphs, last, length, active, out, done, max_new_tokens,
                                temperature, top_p, generator, eos, eos_t, stats, capture_s)
            break
        round_t0, before, made = time.perf_counter(), sum(len(out[b]) for b in active), (captures[0], capture_s[0])
        q = 1 + k if drafting and not probing else 1
        # ---- draft
        draft_p = [] if not greedy else None
        if q > 1:
            if drafter is not None:
                drafts = drafter(rows, length, [list(o) for o in out]).to(device)
            else:
                drafts = torch.zeros(B, k, dtype=torch.long, device=device)
                x_h, d_logits = draft_h, draft_logits
                for i in range(k):
                    if greedy:
                        d = d_logits.argmax(-1)
                    else:
                        p_draft = probabilities(d_logits, temperature, top_p)
                        draft_p.append(p_draft)
                        d = draw(p_draft, generator)
                        if par.world_size > 1:  # drawn on each rank: rank 0's is chained and fed
                            d = par.broadcast(d.contiguous())
                    drafts[:, i] = d
                    if i + 1 < k:  # chain: the module on its own output hidden, one position further
                        d_logits, x_h = model.mtp_step(d[:, None], x_h[:, None], length + i, mtp_cache,
                                                       max(lens) + i + 1, take=zero)
            feed = torch.cat([last[:, None], drafts], dim=1)  # [B, q]: x_L and the drafts
        # ---- verify: the main model over q = 1 + k positions per row (1: a plain step)
        span = max(lens) + q
        fused = q > 1 and greedy and mtp_cache is not None  # the round in one step (greedy_round)
        if q == 1:  # a probe or a timed plain step: its hidden feeds the MTP cache (now, or if drafting resumes)
            v_logits, v_hidden = plain_step(model, kept, cache, B, total, graphs, capture_s)(last, length, span)
            v_logits, v_hidden = v_logits[:, None], v_hidden[:, None]  # [B, 1, V], [B, 1, D]
        elif fused:
            step = static_step("round", q)
            draft_logits, choice_t, accepted_t, draft_h, logits_sum = (
                step(tokens=feed, positions=length) if step is not None else
                greedy_round(model, cache, mtp_cache, feed, length, span))
        elif (step := static_step("verify", q)) is not None:
            v_logits, v_hidden = step(tokens=feed, positions=length)  # [B, q, V], [B, q, D]
        else:
            v_logits, v_hidden = model.forward_step(feed, length, cache, span)
        stats.steps += 1
        sums.append(logits_sum.clone() if fused else v_logits.sum())  # a replayed round rewrites its sum's buffer
        if fused:  # one host read: the choices and the accepted counts
            host = torch.cat([choice_t, accepted_t[:, None]], dim=1).tolist()  # [B][q + 1]
            new = [row[:row[q] + 1] for row in host]  # the accepted drafts (= the choices before them), then one
        elif greedy:
            choice = v_logits.argmax(-1).tolist()  # [B][q]: the main model's token after each fed one
            fed = drafts.tolist() if q > 1 else [[]] * B
            new = [accept_greedy(choice[b], fed[b]) for b in range(B)]
        else:
            p_main = probabilities(v_logits.reshape(B * q, -1), temperature, top_p).view(B, q, -1)
            new = [accept_sampled(p_main[b], drafts[b] if q > 1 else no_drafts, [p[b] for p in draft_p] if draft_p
                                  else None, generator) for b in range(B)]
        if probing and not pending:  # the draft a round would have fed, scored against the token just chosen
            hits += float(first_draft_lands(draft_logits[active], v_logits[active, 0], temperature, top_p).sum())
            probed += len(active)
        elif probing:  # its draft comes with the MTP module's catch-up
            unscored.append((len(pending), active, v_logits[:, 0].clone()))  # a replayed step reuses its buffer
        if par.world_size > 1:  # rank 0's acceptance (its draws; the greedy choices agree anyway)
            box = torch.tensor([row + [-1] * (q - len(row) + 1) for row in new], device=device)  # [B, q + 1]
            new = [[t for t in row if t >= 0] for row in par.broadcast(box).tolist()]
        n_host = [len(kept) - 1 for kept in new]  # accepted drafts per row
        # ---- keep: n + 1 new tokens per row (cut at EOS and max_new_tokens); the cache keeps x_L and the accepted
        for b in active:
            for t in new[b]:
                out[b].append(t)
                if t in eos or len(out[b]) >= max_new_tokens:
                    done[b] = done[b] or t in eos or len(out[b]) >= max_new_tokens
                    break
        if probing:
            probes += 1
        elif drafting:
            rounds += 1
            row_rounds += len(active)
            proposed += k * len(active)
            accepted += sum(n_host[b] for b in active)
            firsts += sum(n_host[b] > 0 for b in active)
        # ---- catch up the MTP cache (a fused round did): pairs (main hidden at L + j, token L + j + 1), j = 0 .. n
        if not fused:
            nxt = torch.tensor([new[b][:q] + [0] * (q - len(new[b][:q])) for b in range(B)], device=device)  # [B, q]
        if mtp_cache is not None and q == 1 and not decided:  # a probe or a timed plain step: its pair waits
            if not pending:
                pending_at = length
            pending.append((v_hidden.clone(), nxt[:, 0]))
        elif mtp_cache is not None and drafting and not fused:
            n = torch.tensor(n_host, device=device)  # [B]
            step = static_step("draft", q)
            if step is not None:
                draft_logits, draft_h = step(tokens=nxt, hidden=v_hidden, positions=length, take=n)
            else:
                draft_logits, draft_h = model.mtp_step(nxt, v_hidden, length, mtp_cache, span, take=n)
        for b in active:  # finished rows ride along, frozen at their length
            lens[b] += n_host[b] + 1
            lasts[b] = new[b][-1]
        last, length = torch.tensor(lasts, device=device), torch.tensor(lens, device=device)
        if decided:
            continue
        if (captures[0], capture_s[0]) == made:  # timed, unless a step was made in it (a one-off cost)
            took[drafting and not probing].append(time.perf_counter() - round_t0)
            gained[drafting and not probing] += sum(len(out[b]) for b in active) - before
        if probing:
            start = agreed(_start_drafting(hits))
            if not start and probes >= QUIT_AFTER:
                hits += catch_up(score=True)
                start = agreed(_start_drafting(hits))
            if start:
                if pending:
                    catch_up(score=False)
                probing = False
            elif probes >= QUIT_AFTER:
                decided, drafting = True, False
                log.info("speculative decoding: no draft would have landed in %d probes; drafting stops", probes)
            continue
        # a round's cost in plain steps: the fastest of each (a slow spell of the machine only inflates a time)
        cost = min(took[True]) / min(took[False]) if len(took[True]) >= 2 and took[False] else None
        if drafting and rounds >= QUIT_AFTER and agreed(accepted + hits == 0):  # never landed: cannot win, no trial
            decided, drafting = True, False
            log.info("speculative decoding: no draft accepted in %d rounds; drafting stops", rounds)
        elif drafting and cost is not None and agreed(_cannot_pay(cost, k, firsts + hits, row_rounds + probed)):
            decided, drafting = True, False
            log.info("speculative decoding: a round costs %.2f plain steps and %.0f of %d first drafts landed; "
                     "drafting stops", cost, firsts + hits, row_rounds + probed)
        elif drafting and rounds >= JUDGE_AFTER:
            drafting, trial = False, 0  # now time plain steps
        elif not drafting:
            trial += 1
            if trial == JUDGE_AFTER:
                decided = True
                rate = {mode: gained[mode] / max(sum(took[mode]), 1e-9) for mode in took}
                drafting = agreed(_keep_drafting(rate))
                log.info("speculative decoding: %.1f tok/s drafting (acceptance %.0f%%) vs %.1f tok/s plain; %s",
                         rate[True], 100 * (accepted + hits) / max(proposed + probed, 1), rate[False],
                         "drafting goes on" if drafting else "drafting stops")
                if drafting and mtp_cache is not None:  # the MTP cache catches up on the timed plain steps
                    catch_up(score=False)
    if sums and not bool(all_finite(torch.stack(sums))):
        raise NonFiniteLogits(NAN_DECODE)
    stats.decode_s = time.perf_counter() - t0 - capture_s[0]
    stats.extra["capture_s"] = capture_s[0]
    if keep is not None:
        keep.update(cache=cache, mtp_cache=mtp_cache, length=length.tolist())
    results = []
    for row in out:
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        results.append(row[:min(cut, max_new_tokens)])
    stats.decode_tokens = sum(len(r) for r in results)
    made = [step for step in (kept.get("plain"), *static.values()) if step is not None]
    stats.extra["decode_step"] = "graph" if any(step.captured for step in made) else "static" if made else "eager"
    stats.extra.update(speculative="mtp", draft_tokens=k, rounds=rounds, probes=probes,
                       acceptance=(accepted + hits) / max(proposed + probed, 1),
                       tokens_per_round=1 + accepted / max(row_rounds, 1), drafting_at_end=drafting)
    return results, stats
