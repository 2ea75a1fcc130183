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
import time

import torch

from .errors import DsvError
from .generate import (
    DecodeStep,
    NonFiniteLogits,
    StaticStep,
    Stats,
    StepPool,
    all_finite,
    draw,
    probabilities,
    sample,
)
from .model import LatentCache, Transformer

log = logging.getLogger("dsv3")
#: adaptive mode: this many drafting rounds, then this many plain steps, both timed; the faster one goes on.
#: Drafts none of which landed in the first QUIT_AFTER rounds stop at once (a drafter with the 85% acceptance of
#: DeepSeek-V3's report misses its first draft three times running once in ~300 runs: 0.15^3)
JUDGE_AFTER, QUIT_AFTER = 4, 3
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


def _worth_capturing(decided: bool, accepted: int) -> bool:
    """While the adaptive mode still judges, capture only once a draft has landed: drafts that never land quit
    after QUIT_AFTER rounds, and captures for those few rounds would cost more than they save."""
    return decided or accepted > 0


def _keep_drafting(rate: dict[bool, float]) -> bool:
    """The adaptive decision: tokens/s while drafting (True) against plain steps (False)."""
    return rate[True] > rate[False]


@torch.inference_mode()
def speculative_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, draft_tokens: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, eos_ids: tuple[int, ...] = (),
                         seed: int | None = None, dtype: torch.dtype | None = None, drafter=None,
                         adaptive: bool = True, keep: dict | None = None, graphs: bool = True,
                         pool: StepPool | None = None) -> tuple[list[list[int]], Stats]:
    """New tokens per prompt (EOS excluded) and stats (acceptance in stats.extra). `drafter(rows, lengths, drafts)`,
    if given, replaces the MTP module's drafts (tests: perfect or always-wrong drafts); it returns [B, k] ids.
    `adaptive`: time JUDGE_AFTER drafting rounds and JUDGE_AFTER plain steps, then go on with the faster (drafts
    that rarely land cost a verify and a draft per token; where that is, speculation turns itself off).
    `keep`, if given, receives the final caches and per-row lengths (tests check them against a plain run).
    Once drafting has stopped for good, the rest decodes through the plain decode step, captured where the backend
    can (`graphs`), so a run that gave up drafting is as fast as one that never drafted. `pool`: where the caches
    and captured steps are kept for the next call of the same shape."""
    if len(model.mtp) == 0 and drafter is None:
        raise DsvError("speculative decoding needs the checkpoint's MTP layer (num_nextn_predict_layers >= 1, "
                       "loaded with with_mtp=True); run without --speculative")
    if draft_tokens < 1:
        raise DsvError(f"draft_tokens={draft_tokens}; give at least 1")
    if model.par.world_size > 1:
        raise DsvError("speculative decoding under tensor parallel is not supported yet; run without --speculative")
    device, k = model.rope_cos.device, draft_tokens
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
        raise NonFiniteLogits("the model produced NaN/Inf logits for the prompt; the weights are likely corrupt")
    last = sample(logits, temperature, top_p, generator)  # [B] x_L: chosen, not yet in the cache
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
    done = [out[b][0] in eos for b in range(B)]
    proposed = accepted = rounds = row_rounds = 0
    drafting, decided = True, not adaptive or drafter is not None
    timing = {True: [0.0, 0], False: [0.0, 0]}  # drafting or not: seconds, tokens gained
    plain_trial: list[tuple[torch.Tensor, torch.Tensor]] = []  # (hidden [B, 1, D], token [B]) of each timed plain step
    plain_step: DecodeStep | None = kept.get("plain")
    # static steps per (kind, q), captured once a shape has run CAPTURE_AFTER times and is worth it (_worth_capturing):
    # the verify step (q = 1 + k while drafting, 1 for the timed plain steps) and the MTP catch-up (q = 1 + k)
    static: dict[tuple[str, int], StaticStep] = kept.setdefault("static", {})
    uses: dict[tuple[str, int], int] = {}

    # static steps made so far (a round that made one is not timed: a one-off cost, not its speed) and the seconds
    # their captures took, kept out of decode_s as generate() keeps its decode step's capture out
    captures, capture_s = [0], [0.0]

    def static_step(kind: str, q: int) -> StaticStep | None:
        uses[kind, q] = uses.get((kind, q), 0) + 1
        if (kind, q) not in static and uses[kind, q] > CAPTURE_AFTER and _worth_capturing(decided, accepted):
            t = time.perf_counter()
            static[kind, q] = (verify_step(model, cache, B, q, total, graphs) if kind == "verify" else
                               draft_step(model, mtp_cache, B, q, total, dtype, graphs))
            captures[0] += 1
            capture_s[0] += time.perf_counter() - t
        return static.get((kind, q))
    while True:
        active = [b for b in range(B) if not done[b] and len(out[b]) < max_new_tokens]
        if not active:
            break
        round_t0, before, made = time.perf_counter(), sum(len(out[b]) for b in active), captures[0]
        live = torch.zeros(B, dtype=torch.bool, device=device)
        live[active] = True  # finished rows ride along, frozen at their length
        q = 1 + k if drafting else 1
        # ---- draft
        drafts = torch.zeros(B, k, dtype=torch.long, device=device)
        draft_p = [] if not greedy else None
        if drafting:
            if drafter is not None:
                drafts = drafter(rows, length, [list(o) for o in out]).to(device)
            else:
                x_h, d_logits = draft_h, draft_logits
                for i in range(k):
                    if greedy:
                        d = d_logits.argmax(-1)
                    else:
                        p_draft = probabilities(d_logits, temperature, top_p)
                        draft_p.append(p_draft)
                        d = draw(p_draft, generator)
                    drafts[:, i] = d
                    if i + 1 < k:  # chain: the module on its own output hidden, one position further
                        d_logits, x_h = model.mtp_step(d[:, None], x_h[:, None], length + i, mtp_cache,
                                                       int(length.max()) + i + 1, take=zero)
        # ---- verify: x_L and the drafts through the main model, q = 1 + k positions per row
        feed = torch.cat([last[:, None], drafts[:, :q - 1]], dim=1)  # [B, q]
        span = int(length.max()) + q
        if decided and not drafting:  # drafting stopped for good: the plain decode step, captured where it can be
            if plain_step is None:
                t = time.perf_counter()
                plain_step = kept["plain"] = DecodeStep(model, cache, B, total, graphs=graphs)
                capture_s[0] += time.perf_counter() - t
            v_logits, v_hidden = plain_step(last, length, span)[:, None], None  # [B, 1, V]; the hidden is not needed
        else:  # a round, or a timed plain step (its hidden feeds the MTP cache if drafting resumes)
            step = static_step("verify", q)
            if step is not None:
                v_logits, v_hidden = step(tokens=feed, positions=length)  # [B, q, V], [B, q, D]
            else:
                v_logits, v_hidden = model.forward_step(feed, length, cache, span)
        stats.steps += 1
        if greedy:
            choice = v_logits.argmax(-1).tolist()  # [B][q]: the main model's token after each fed one
            fed = drafts[:, :q - 1].tolist()
            new = [accept_greedy(choice[b], fed[b]) for b in range(B)]
        else:
            p_main = probabilities(v_logits.reshape(B * q, -1), temperature, top_p).view(B, q, -1)
            new = [accept_sampled(p_main[b], drafts[b, :q - 1], [p[b] for p in draft_p] if draft_p else None,
                                  generator) for b in range(B)]
        n = torch.tensor([len(kept) - 1 for kept in new], device=device)  # [B] accepted drafts
        if not bool(all_finite(v_logits)):
            raise NonFiniteLogits("the model produced NaN/Inf logits while decoding; the weights are likely corrupt")
        # ---- keep: n + 1 new tokens per row (cut at EOS and max_new_tokens); the cache keeps x_L and the accepted
        for b in active:
            for t in new[b]:
                out[b].append(t)
                if t in eos or len(out[b]) >= max_new_tokens:
                    done[b] = done[b] or t in eos or len(out[b]) >= max_new_tokens
                    break
        if drafting:
            rounds += 1
            row_rounds += len(active)
            proposed += k * len(active)
            accepted += int(n[active].sum())
        # ---- catch up the MTP cache: pairs (main hidden at L + j, token L + j + 1) for j = 0 .. n
        nxt = torch.tensor([new[b][:q] + [0] * (q - len(new[b][:q])) for b in range(B)], device=device)  # [B, q]
        if mtp_cache is not None and drafting:
            step = static_step("draft", q)
            if step is not None:
                draft_logits, draft_h = step(tokens=nxt, hidden=v_hidden, positions=length, take=n)
            else:
                draft_logits, draft_h = model.mtp_step(nxt, v_hidden, length, mtp_cache, span, take=n)
        last = torch.where(live, torch.tensor([new[b][-1] for b in range(B)], device=device), last)
        length = torch.where(live, length + n + 1, length)
        if decided:
            continue
        if captures[0] == made:
            timing[drafting][0] += time.perf_counter() - round_t0
            timing[drafting][1] += sum(len(out[b]) for b in active) - before
        if drafting and rounds >= QUIT_AFTER and accepted == 0:  # drafts that never land cannot win: no trial
            decided, drafting = True, False
            log.info("speculative decoding: no draft accepted in %d rounds; drafting stops", rounds)
        elif drafting and rounds >= JUDGE_AFTER:
            drafting, trial_start = False, length.clone()  # now time plain steps
        elif not drafting:
            plain_trial.append((v_hidden.clone(), nxt[:, 0]))  # a replayed step reuses its output buffer
            if len(plain_trial) == JUDGE_AFTER:
                decided = True
                rate = {mode: t[1] / max(t[0], 1e-9) for mode, t in timing.items()}
                drafting = _keep_drafting(rate)
                log.info("speculative decoding: %.1f tok/s drafting (acceptance %.0f%%) vs %.1f tok/s plain; %s",
                         rate[True], 100 * accepted / max(proposed, 1), rate[False],
                         "drafting goes on" if drafting else "drafting stops")
                if drafting and mtp_cache is not None:  # the MTP cache catches up on the timed plain steps
                    h = torch.cat([t[0] for t in plain_trial], dim=1)  # [B, J, D]
                    toks = torch.stack([t[1] for t in plain_trial], dim=1)  # [B, J]
                    draft_logits, draft_h = model.mtp_step(toks, h, trial_start, mtp_cache,
                                                           int(trial_start.max()) + len(plain_trial),
                                                           take=torch.full_like(zero, len(plain_trial) - 1))
    stats.decode_s = time.perf_counter() - t0 - capture_s[0]
    stats.extra["capture_s"] = capture_s[0]
    if keep is not None:
        keep.update(cache=cache, mtp_cache=mtp_cache, length=length.tolist())
    results = []
    for row in out:
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        results.append(row[:min(cut, max_new_tokens)])
    stats.decode_tokens = sum(len(r) for r in results)
    stats.extra.update(speculative="mtp", draft_tokens=k, rounds=rounds, acceptance=accepted / max(proposed, 1),
                       tokens_per_round=1 + accepted / max(row_rounds, 1), drafting_at_end=drafting)
    return results, stats
