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
import statistics
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
from .rounds import accept_greedy, accept_sampled, draft_step, first_draft_lands, greedy_round, round_step, verify_step

log = logging.getLogger("dsv3")
#: adaptive mode: this many drafting rounds, then this many plain steps, both timed; the faster one goes on.
#: Before the rounds, the MTP drafter is probed on plain steps; if none of its first QUIT_AFTER drafts would have
#: landed, drafting stops at once (a drafter with the 85% acceptance of DeepSeek-V3's report misses three drafts
#: running once in ~300 runs: 0.15^3). Drafts, not probes: a probe of a batch scores a draft per row, so a batch of
#: 3 or more decides on its first probe, scored from the prefill's drafts (no MTP call), where 3 probes and the
#: MTP call that scores them cost it ~4 plain steps (measured at batch 8 on the demo model). A substituted drafter
#: (tests) is judged the same way on its first QUIT_AFTER drafts (rounds x rows).
JUDGE_AFTER, QUIT_AFTER = 4, 3
#: the rounds stop before JUDGE_AFTER once the drafts landed so far make the break-even acceptance implausible (as
#: few landing at that acceptance has a chance below STOP_P): a drafter far below break-even costs ~2 rounds, not 4
STOP_P = 0.01
#: a step shape (verify or draft, q tokens per row) is captured once it has run this many times. At once: a capture
#: costs about what the eager runs it would wait through cost (cpu: one recorded run and one check; a GPU: two warm-up
#: runs), and the rounds that follow replay it (measured on the cpu at 64 new tokens: 3 eager rounds first cost the
#: perfect-draft run ~20% of its speed)
CAPTURE_AFTER = 0


def _worth_capturing(decided: bool, accepted: int) -> bool:
    """While the adaptive mode still judges, capture only once a draft has landed: drafts that never land stop
    after QUIT_AFTER drafts (probed, or in rounds for a substituted drafter), and captures for those would cost more
    than they save."""
    return decided or accepted > 0


def _rate(took: list[float], gained: int) -> float:
    """A mode's tokens/s over its timed steps: the tokens over as many steps of the median time. A sum of the
    times would let one slow spell decide alone (a 3.5 ms plain step among 0.6 ms ones, seen on the demo model,
    kept drafting on)."""
    return gained / max(len(took) * statistics.median(took), 1e-9)


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


class _Speculation:
    """One speculative_generate call: both caches, each row's answer and cache length (on the host and the device),
    the static steps, and what the adaptive mode has counted and timed so far. `prefill`, then `decode` (rounds
    and probes, then generate's own loop once drafting has stopped for good), then `results`."""

    def __init__(self, model: Transformer, prompts: list[list[int]], max_new_tokens: int, k: int, temperature: float,
                 top_p: float, eos_ids: tuple[int, ...], seed: int | None, dtype: torch.dtype | None, drafter,
                 adaptive: bool | None, graphs: bool, pool: StepPool | None):
        if len(model.mtp) == 0 and drafter is None:
            raise DsvError("speculative decoding needs the checkpoint's MTP layer (num_nextn_predict_layers >= 1, "
                           "loaded with with_mtp=True); run without --speculative")
        if k < 1:
            raise DsvError(f"draft_tokens={k}; give at least 1")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("empty prompt")
        L = max(lengths)
        total = L + max_new_tokens + 2 * k + 2  # a round writes k + 1 entries past a row's length: may pass the cut
        if total > model.max_seq_len:
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) + {k + 1} draft positions "
                             f"exceeds max_seq_len={model.max_seq_len}")
        self.model, self.par, self.device, self.k, self.B = model, model.par, model.rope_cos.device, k, len(prompts)
        self.max_new, self.temperature, self.top_p, self.greedy = max_new_tokens, temperature, top_p, temperature <= 0
        self.drafter, self.graphs, self.total = drafter, graphs, total
        self.dtype = dtype or model.embed.weight.dtype
        # kept caches hold an earlier call's entries, all past this call's lengths until it writes them: never read
        self.kept = pool.take(("speculative", self.B, total, self.dtype, graphs)) if pool is not None else {}
        if "cache" not in self.kept:
            self.kept["cache"] = LatentCache.allocate(model.cfg, len(model.layers), self.B, total, self.dtype,
                                                      self.device)
            self.kept["mtp_cache"] = (LatentCache.allocate(model.cfg, 1, self.B, total, self.dtype, self.device)
                                      if len(model.mtp) else None)
        self.cache, self.mtp_cache = self.kept["cache"], self.kept["mtp_cache"]
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.eos = set(eos_ids)
        self.eos_t = torch.tensor(list(eos_ids) or [-1], device=self.device)
        self.stats = Stats()
        self.rows = torch.arange(self.B, device=self.device)
        self.zero = torch.zeros(self.B, dtype=torch.long, device=self.device)
        self.no_drafts = torch.zeros(0, dtype=torch.long, device=self.device)  # a plain step's, sampling
        self.sums: list[torch.Tensor] = []  # each step's logits summed: NaN/Inf checked once, after the loop
        self.proposed = self.accepted = self.rounds = self.row_rounds = self.probes = self.probed = 0
        self.firsts = 0  # rounds (per row) whose first draft landed
        self.hits = 0.0  # drafts that would have landed in the probes (sampling: the probability they would have)
        self.drafting, self.decided = True, not (adaptive if adaptive is not None else drafter is None)
        # adaptive with the MTP drafter: first probe, plain steps whose token is compared with the draft the MTP
        # module would have fed. The first is scored at once (the prefill left the drafts' logits); the module catches
        # up on the next ones in one call once they make QUIT_AFTER drafts, which scores them all: a drafter that
        # never lands costs one MTP call over the probes (~1 MTP step), not one per probe (2-3 plain steps' time each
        # on a small model), and a batch of QUIT_AFTER rows or more none
        self.probing = not self.decided and drafter is None and self.mtp_cache is not None
        # drafting or not: each timed round's (plain step's) seconds, and the tokens they gained; probes are plain
        self.took: dict[bool, list[float]] = {True: [], False: []}
        self.gained = {True: 0, False: 0}
        self.trial = 0  # plain steps timed so far
        self.plain_s = 0.0  # the last plain step's seconds (step)
        # plain steps the MTP cache has not caught up on (probes, timed plain steps): (hidden [B, 1, D], token [B])
        # each, the first at positions pending_at [B]; and the probes that wait for it to be scored: (index in
        # pending, rows, the main model's logits [B, V])
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.unscored: list[tuple[int, list[int], torch.Tensor]] = []
        # static steps per (kind, q), captured once a shape has run CAPTURE_AFTER times and is worth it
        # (_worth_capturing): the verify step (q = 1 + k) and the MTP catch-up (q = 1 + k, or 1 after a first probe
        # that landed); the plain steps (q = 1) are generate's decode step (plain_step)
        self.static: dict[tuple[str, int], StaticStep] = self.kept.setdefault("static", {})
        # runs of each (kind, q), over the calls that keep this shape. The probes' scoring ("score") runs once a call
        # at most, so its step is captured at its second run, the next call's (a capture costs ~2 eager runs;
        # repeated calls, a benchmark's or an embedding runtime's, then replay it: ~0.4 ms instead of ~1 ms eager on
        # the demo model, 5-10% of a 32-token answer)
        self.uses: dict[tuple[str, int], int] = self.kept.setdefault("uses", {})
        # static steps made so far (a round that made one is not timed: a one-off cost, not its speed) and the seconds
        # their captures took, kept out of decode_s as generate() keeps its decode step's capture out
        self.captures, self.capture_s = 0, 0.0

    def agreed(self, flag: bool) -> bool:
        """Under tensor parallel every rank runs this loop; what it decides on the host (timings, draws) is rank
        0's, so the ranks run the same steps."""
        if self.par.world_size == 1:
            return flag
        return bool(self.par.broadcast(torch.tensor([int(flag)], device=self.device)))

    # ---- prefill: the main model over the prompts, then the MTP module over the same positions
    def prefill(self, prompts: list[list[int]]) -> None:
        t0 = time.perf_counter()
        model, B, L, dev = self.model, self.B, max(map(len, prompts)), self.device
        tokens = torch.zeros(B, L, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.lens = [len(p) for p in prompts]  # the host's copy of each row's main-cache entries ...
        self.length = torch.tensor(self.lens, device=dev)  # [B] ... and the device's
        logits, hidden = model.forward_step(tokens, self.zero, self.cache, L, take=self.length - 1,
                                            all_hidden=True)  # [B, V], [B, L, D]
        if not bool(all_finite(logits)):
            raise NonFiniteLogits(NAN_PROMPT)
        self.last = self.par.broadcast(sample(logits, self.temperature, self.top_p, self.generator))  # [B] x_L: chosen,
        self.out: list[list[int]] = [[int(t)] for t in self.last.tolist()]  # not yet in the cache
        # the host's copy of each row's last token, so a round spends few small ops on bookkeeping (each costs
        # ~20-60 us on a cpu right after a step: ~0.5 ms a round, 5% of a step, before these)
        self.lasts = [o[0] for o in self.out]
        self.done = [o[0] in self.eos for o in self.out]
        self.draft_h, self.draft_logits = None, None
        if self.mtp_cache is not None:
            nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # the token after each position ...
            nxt[self.rows, self.length - 1] = self.last  # ... and x_L after the last one
            self.draft_logits, self.draft_h = model.mtp_step(nxt, hidden, self.zero, self.mtp_cache, L,
                                                             take=self.length - 1)
        self.pending_at = self.length
        self.stats.prefill_tokens, self.stats.prefill_s = sum(self.lens), time.perf_counter() - t0  # with the MTP's

    # ---- the steps
    def static_step(self, kind: str, q: int) -> StaticStep | None:
        """The static step of this kind and shape: made once it has run CAPTURE_AFTER times and is worth it."""
        key = (kind, q)
        self.uses[key] = self.uses.get(key, 0) + 1
        worth = self.uses[key] > 1 if kind == "score" else _worth_capturing(self.decided, self.accepted + self.hits)
        if key not in self.static and self.uses[key] > CAPTURE_AFTER and worth:
            t, model, B, span, graphs = time.perf_counter(), self.model, self.B, self.total, self.graphs
            self.static[key] = (verify_step(model, self.cache, B, q, span, graphs) if kind == "verify" else
                                round_step(model, self.cache, self.mtp_cache, B, q, span, graphs) if kind == "round"
                                else draft_step(model, self.mtp_cache, B, q, span, self.dtype, graphs,
                                                every=kind == "score"))
            self.captures += 1
            self.capture_s += time.perf_counter() - t
        return self.static.get(key)

    def plain_step(self) -> DecodeStep:
        """generate's decode step over the main cache (logits and the hidden the drafter reads), made once, kept."""
        if "plain" not in self.kept:
            t = time.perf_counter()
            self.kept["plain"] = DecodeStep(self.model, self.cache, self.B, self.total, graphs=self.graphs)
            self.capture_s += time.perf_counter() - t
        return self.kept["plain"]

    def catch_up(self, score: bool) -> float:
        """The MTP module over the pending pairs in one call -> its drafts' logits and hidden for the next round;
        `score`: at every position, so each waiting probe is scored against the draft of the position before it
        -> the probability mass of those that would have landed."""
        J, landed, at = len(self.pending), 0.0, self.pending_at
        h = torch.cat([p[0] for p in self.pending], dim=1)  # [B, J, D]
        toks = torch.stack([p[1] for p in self.pending], dim=1)  # [B, J]
        span = int(at.max()) + J
        if score:  # [B, J, V], [B, J, D]
            step = self.static_step("score", J)
            dl, dh = (step(tokens=toks, hidden=h, positions=at) if step is not None else
                      self.model.mtp_step(toks, h, at, self.mtp_cache, span, take=None))
            for i, scored, main in self.unscored:
                landed += float(first_draft_lands(dl[scored, i - 1], main[scored], self.temperature, self.top_p).sum())
                self.probed += len(scored)
            self.draft_logits, self.draft_h = dl[:, -1], dh[:, -1]
        elif J == 1 and (step := self.static_step("draft", 1)) is not None:  # the first probe landed: the usual start
            self.draft_logits, self.draft_h = step(tokens=toks, hidden=h, positions=at, take=self.zero)
        else:
            self.draft_logits, self.draft_h = self.model.mtp_step(toks, h, at, self.mtp_cache, span,
                                                                  take=torch.full_like(self.zero, J - 1))
        self.pending.clear()
        self.unscored.clear()
        return landed

    def draft(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """k drafts per row [B, k] (the drafter's, or the MTP module's chained on itself) and, when sampling, the
        distributions they were drawn from (k of [B, V])."""
        draft_p: list[torch.Tensor] = []
        if self.drafter is not None:
            return self.drafter(self.rows, self.length, [list(o) for o in self.out]).to(self.device), draft_p
        drafts = torch.zeros(self.B, self.k, dtype=torch.long, device=self.device)
        x_h, d_logits = self.draft_h, self.draft_logits
        for i in range(self.k):
            if self.greedy:
                d = d_logits.argmax(-1)
            else:
                p_draft = probabilities(d_logits, self.temperature, self.top_p)
                draft_p.append(p_draft)
                d = draw(p_draft, self.generator)
                if self.par.world_size > 1:  # drawn on each rank: rank 0's is chained and fed
                    d = self.par.broadcast(d.contiguous())
            drafts[:, i] = d
            if i + 1 < self.k:  # chain: the module on its own output hidden, one position further
                d_logits, x_h = self.model.mtp_step(d[:, None], x_h[:, None], self.length + i, self.mtp_cache,
                                                    max(self.lens) + i + 1, take=self.zero)
        return drafts, draft_p

    def step(self, active: list[int]) -> None:
        """One round (q = 1 + k: draft, verify, accept, catch up) or one plain step (q = 1: a probe or a timed plain
        step) for the active rows; the others ride along, frozen at their length."""
        B, k, model, greedy = self.B, self.k, self.model, self.greedy
        q = 1 + k if self.drafting and not self.probing else 1
        drafts, draft_p = self.draft() if q > 1 else (None, [])
        # ---- verify: the main model over q = 1 + k positions per row (1: a plain step)
        feed = torch.cat([self.last[:, None], drafts], dim=1) if q > 1 else None  # [B, q]: x_L and the drafts
        span = max(self.lens) + q
        fused = q > 1 and greedy and self.mtp_cache is not None  # the round in one step (greedy_round)
        t = time.perf_counter()
        if q == 1:  # a probe or a timed plain step: its hidden feeds the MTP cache (now, or if drafting resumes)
            v_logits, v_hidden = self.plain_step()(self.last, self.length, span)
            v_logits, v_hidden = v_logits[:, None], v_hidden[:, None]  # [B, 1, V], [B, 1, D]
        elif fused:
            step = self.static_step("round", q)
            self.draft_logits, choice_t, accepted_t, self.draft_h, logits_sum = (
                step(tokens=feed, positions=self.length) if step is not None else
                greedy_round(model, self.cache, self.mtp_cache, feed, self.length, span))
        elif (step := self.static_step("verify", q)) is not None:
            v_logits, v_hidden = step(tokens=feed, positions=self.length)  # [B, q, V], [B, q, D]
        else:
            v_logits, v_hidden = model.forward_step(feed, self.length, self.cache, span)
        self.stats.steps += 1
        self.sums.append(logits_sum.clone() if fused else v_logits.sum())  # a replayed round rewrites its buffer
        # ---- accept: each row's accepted drafts, then the main model's own next token
        if fused:  # one host read: the choices and the accepted counts
            host = torch.cat([choice_t, accepted_t[:, None]], dim=1).tolist()  # [B][q + 1]
            new = [row[:row[q] + 1] for row in host]  # the accepted drafts (= the choices before them), then one
        elif greedy:
            choice = v_logits.argmax(-1).tolist()  # [B][q]: the main model's token after each fed one
            fed = drafts.tolist() if q > 1 else [[]] * B
            new = [accept_greedy(choice[b], fed[b]) for b in range(B)]
        else:
            p_main = probabilities(v_logits.reshape(B * q, -1), self.temperature, self.top_p).view(B, q, -1)
            new = [accept_sampled(p_main[b], drafts[b] if q > 1 else self.no_drafts, [p[b] for p in draft_p] if draft_p
                                  else None, self.generator) for b in range(B)]
        if q == 1:  # the step and the host read of its tokens: what generate's loop pays a token, once drafting stops
            self.plain_s = time.perf_counter() - t
        if self.probing and not self.pending:  # the draft a round would have fed, scored against the token chosen
            self.hits += float(first_draft_lands(self.draft_logits[active], v_logits[active, 0], self.temperature,
                                                 self.top_p).sum())
            self.probed += len(active)
        elif self.probing:  # its draft comes with the MTP module's catch-up
            self.unscored.append((len(self.pending), active, v_logits[:, 0].clone()))  # a replay reuses its buffer
        if self.par.world_size > 1:  # rank 0's acceptance (its draws; the greedy choices agree anyway)
            box = torch.tensor([row + [-1] * (q - len(row) + 1) for row in new], device=self.device)  # [B, q + 1]
            new = [[t for t in row if t >= 0] for row in self.par.broadcast(box).tolist()]
        n_host = [len(row) - 1 for row in new]  # accepted drafts per row
        # ---- keep: n + 1 new tokens per row (cut at EOS and max_new_tokens); the cache keeps x_L and the accepted
        for b in active:
            for t in new[b]:
                self.out[b].append(t)
                if t in self.eos or len(self.out[b]) >= self.max_new:
                    self.done[b] = True
                    break
        if self.probing:
            self.probes += 1
        elif self.drafting:
            self.rounds += 1
            self.row_rounds += len(active)
            self.proposed += k * len(active)
            self.accepted += sum(n_host[b] for b in active)
            self.firsts += sum(n_host[b] > 0 for b in active)
        # ---- catch up the MTP cache (a fused round did): pairs (main hidden at L + j, token L + j + 1), j = 0 .. n
        if not fused:
            nxt = torch.tensor([new[b][:q] + [0] * (q - len(new[b][:q])) for b in range(B)], device=self.device)
        if self.mtp_cache is not None and q == 1 and not self.decided:  # a probe or a timed plain step: it waits
            if not self.pending:
                self.pending_at = self.length
            self.pending.append((v_hidden.clone(), nxt[:, 0]))
        elif self.mtp_cache is not None and self.drafting and not fused:
            n = torch.tensor(n_host, device=self.device)  # [B]
            step = self.static_step("draft", q)
            if step is not None:
                self.draft_logits, self.draft_h = step(tokens=nxt, hidden=v_hidden, positions=self.length, take=n)
            else:
                self.draft_logits, self.draft_h = model.mtp_step(nxt, v_hidden, self.length, self.mtp_cache, span,
                                                                 take=n)
        for b in active:
            self.lens[b] += n_host[b] + 1
            self.lasts[b] = new[b][-1]
        self.last, self.length = (torch.tensor(x, device=self.device) for x in (self.lasts, self.lens))

    # ---- the adaptive mode
    def judge(self) -> None:
        """After a timed step: while probing, whether to start drafting (or stop for good); while drafting, whether
        it is hopeless; after JUDGE_AFTER rounds and as many plain steps, which mode goes on."""
        if self.probing:
            start = self.agreed(_start_drafting(self.hits))
            drafts = self.probed + sum(len(rows) for _, rows, _ in self.unscored)  # scored, or waiting to be
            if not start and drafts >= QUIT_AFTER and self.unscored:
                self.hits += self.catch_up(score=True)
                start = self.agreed(_start_drafting(self.hits))
            if start:
                if self.pending:
                    self.catch_up(score=False)
                self.probing = False
            elif drafts >= QUIT_AFTER:
                self.decided, self.drafting = True, False
                log.info("speculative decoding: none of %d drafts over %d probes would have landed; drafting stops",
                         drafts, self.probes)
            return
        # a round's cost in plain steps: the fastest of each (a slow spell of the machine only inflates a time)
        took, landed, tried = self.took, self.firsts + self.hits, self.row_rounds + self.probed
        cost = min(took[True]) / min(took[False]) if len(took[True]) >= 2 and took[False] else None
        if self.drafting and self.row_rounds >= QUIT_AFTER and self.agreed(self.accepted + self.hits == 0):
            self.decided, self.drafting = True, False  # never landed: cannot win, no trial
            log.info("speculative decoding: no draft accepted in %d rounds; drafting stops", self.rounds)
        elif self.drafting and cost is not None and self.agreed(_cannot_pay(cost, self.k, landed, tried)):
            self.decided, self.drafting = True, False
            log.info("speculative decoding: a round costs %.2f plain steps and %.0f of %d first drafts landed; "
                     "drafting stops", cost, landed, tried)
        elif self.drafting and self.rounds >= JUDGE_AFTER:
            self.drafting, self.trial = False, 0  # now time plain steps
        elif not self.drafting:
            self.trial += 1
            if self.trial == JUDGE_AFTER:
                self.decided = True
                rate = {mode: _rate(took[mode], self.gained[mode]) for mode in took}
                self.drafting = self.agreed(_keep_drafting(rate))
                log.info("speculative decoding: %.1f tok/s drafting (acceptance %.0f%%) vs %.1f tok/s plain; %s",
                         rate[True], 100 * (self.accepted + self.hits) / max(self.proposed + self.probed, 1),
                         rate[False], "drafting goes on" if self.drafting else "drafting stops")
                if self.drafting and self.mtp_cache is not None:  # the MTP cache catches up on the timed plain steps
                    self.catch_up(score=False)

    # ---- the decode loop
    def decode(self) -> None:
        t0 = time.perf_counter()
        while True:
            active = [b for b in range(self.B) if not self.done[b] and len(self.out[b]) < self.max_new]
            if not active:
                break
            if self.decided and not self.drafting:  # drafting stopped for good: generate's loop on the plain step
                self.plain_tail(active)
                break
            t, before, made = time.perf_counter(), sum(len(self.out[b]) for b in active), (self.captures,
                                                                                          self.capture_s)
            self.step(active)
            if self.decided:
                continue
            if (self.captures, self.capture_s) == made:  # timed, unless a step was made in it (a one-off cost)
                mode = self.drafting and not self.probing
                # a round with all it costs; a plain step without this loop's bookkeeping, which plain_tail does not
                # pay (~0.2 ms a step on a cpu: counted, a round of the demo model read ~1.6 plain steps, not ~2)
                self.took[mode].append(time.perf_counter() - t if mode else self.plain_s)
                self.gained[mode] += sum(len(self.out[b]) for b in active) - before
            self.judge()
        if self.sums and not bool(all_finite(torch.stack(self.sums))):
            raise NonFiniteLogits(NAN_DECODE)
        self.stats.decode_s = time.perf_counter() - t0 - self.capture_s

    def plain_tail(self, active: list[int]) -> None:
        """Once drafting has stopped for good: the rest of the answer through generate's own decode loop on the plain
        decode step (captured where the backend can, kept in `kept`), so a run that gave up drafting decodes as fast
        as one that never drafted (a round's host bookkeeping costs ~0.3 ms, a plain loop's far less). Rows not in
        `active` stay frozen at their length; the others write at most the tokens they still need."""
        decode, length, B = self.plain_step(), self.length, self.B
        need = [self.max_new - len(self.out[b]) if b in active else 0 for b in range(B)]
        cap = length + torch.tensor(need, device=length.device)  # [B] past each row's answer: never read
        top = int(length.max())
        logits, _ = decode(self.last, length, top + 1)  # x_L, chosen last round, into the cache
        pos = torch.minimum(length + 1, cap)
        finished = torch.tensor([b not in active for b in range(B)], device=length.device)
        tokens, finite = decode_tokens(self.model, decode, logits, pos, top + 1, max(need), self.temperature,
                                       self.top_p, self.generator, self.eos_t, finished, self.stats,
                                       cap=None if min(need) == max(need) else cap)  # no row runs past its end
        if not bool(finite & all_finite(logits)):
            raise NonFiniteLogits(NAN_DECODE)
        for b, row in zip(active, tokens[active].tolist()):
            for t in row:
                self.out[b].append(t)
                if t in self.eos or len(self.out[b]) >= self.max_new:
                    break
            self.done[b] = True
        self.length = pos

    def results(self, keep: dict | None) -> tuple[list[list[int]], Stats]:
        stats = self.stats
        stats.extra["capture_s"] = self.capture_s
        if keep is not None:
            keep.update(cache=self.cache, mtp_cache=self.mtp_cache, length=self.length.tolist())
        results = []
        for row in self.out:
            cut = next((j for j, t in enumerate(row) if t in self.eos), len(row))
            results.append(row[:min(cut, self.max_new)])
        stats.decode_tokens = sum(len(r) for r in results)
        made = [step for step in (self.kept.get("plain"), *self.static.values()) if step is not None]
        stats.extra["decode_step"] = "graph" if any(step.captured for step in made) else "static" if made else "eager"
        stats.extra.update(speculative="mtp", draft_tokens=self.k, rounds=self.rounds, probes=self.probes,
                           acceptance=(self.accepted + self.hits) / max(self.proposed + self.probed, 1),
                           tokens_per_round=1 + self.accepted / max(self.row_rounds, 1),
                           drafting_at_end=self.drafting)
        return results, stats


@torch.inference_mode()
def speculative_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, draft_tokens: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, eos_ids: tuple[int, ...] = (),
                         seed: int | None = None, dtype: torch.dtype | None = None, drafter=None,
                         adaptive: bool | None = None, keep: dict | None = None, graphs: bool = True,
                         pool: StepPool | None = None) -> tuple[list[list[int]], Stats]:
    """New tokens per prompt (EOS excluded) and stats (acceptance in stats.extra). `drafter(rows, lengths, drafts)`,
    if given, replaces the MTP module's drafts (tests: perfect or always-wrong drafts); it returns [B, k] ids.
    `adaptive`: probe the drafter on plain steps until a draft would have landed (none of QUIT_AFTER drafts, a
    row's each probe: drafting stops), then time JUDGE_AFTER drafting rounds and JUDGE_AFTER plain steps and go on
    with the faster (drafts that rarely land cost a verify and a draft per token; where that is, speculation turns
    itself off); None: on unless a `drafter` is given (substituted drafts are for tests that want every round to
    draft).
    `keep`, if given, receives the final caches and per-row lengths (tests check them against a plain run).
    Once drafting has stopped for good, the rest decodes through generate's loop (`plain_tail`). `pool`: where the
    caches and captured steps are kept for the next call of the same shape."""
    run = _Speculation(model, prompts, max_new_tokens, draft_tokens, temperature, top_p, eos_ids, seed, dtype, drafter,
                       adaptive, graphs, pool)
    run.prefill(prompts)
    run.decode()
    return run.results(keep)
