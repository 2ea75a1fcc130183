"""MTP drafting in the server's decode step: what a Scheduler started with `speculative="mtp"` runs instead of a
plain step (scheduler.py owns the slots and the emitted tokens; this owns the MTP module's cache, the drafts and
the adaptive switch of drafting.py).

Each round: the MTP module (its own latent cache, one slot per request like the main cache) drafts k tokens per
row, one main-model step over [last, drafts] keeps each row's accepted prefix plus the main model's next token
(rows accept different counts), and the MTP module catches up on the kept positions (core/speculative.py explains
the round). While drafting does not pay, the steps are probes: plain steps whose drafts are only scored.

A round of greedy rows runs fused (verify, acceptance and catch-up in one step: `greedy_round`). Where a row
samples, shapes its logits (logit_bias, penalties, min_tokens) or asks for logprobs, the round verifies and
accepts on the host: position j of a row's verify logits is shaped as if drafts [0, j) were accepted (a kept
draft was), its drafts are drawn from the MTP logits shaped the same way, and the rejection sampler's target is
the shaped distribution, so the tokens are those the row's own plain decoding would give.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..core.errors import DsvError
from ..core.generate import bucket, draw, probabilities
from ..core.model import LatentCache
from ..core.rounds import accept_greedy, accept_sampled, first_draft_lands
from .drafting import DraftPolicy
from .logprobs import entries

if TYPE_CHECKING:
    from .scheduler import Request, Scheduler


class Drafting:
    """A scheduler's MTP drafting: k drafts per row and round, the MTP module's cache, the counts /metrics reports
    (`drafted`, `accepted`) and the policy that switches drafting off and on."""

    def __init__(self, scheduler: Scheduler, draft_tokens: int):
        model = scheduler.model
        if len(model.mtp) == 0:
            raise DsvError("--speculative mtp needs the checkpoint's MTP layer (num_nextn_predict_layers >= 1); "
                           "this one has none: serve without --speculative")
        if draft_tokens < 1:
            raise DsvError(f"--draft-tokens {draft_tokens}: give at least 1")
        self.s, self.k = scheduler, draft_tokens
        self.policy = DraftPolicy(draft_tokens)  # whether to draft now (the adaptive off-switch)
        main = scheduler.cache
        # one slot per request and the scratch slot, as the main cache
        self.cache = LatentCache.allocate(model.cfg, 1, main.kv.shape[1], scheduler.max_len, main.kv.dtype,
                                          main.kv.device)
        scheduler.runner.mtp_cache = self.cache
        self.drafted = self.accepted = 0
        self.probes = 0  # probe steps in all (engine.generate's stats)
        self.probe_steps = 0  # plain steps since the MTP cache last caught up (policy.probe_every apart)

    def prefilled(self, rows: list[Request], slots: list[int], starts: list[int], take: list[int],
                  hidden: torch.Tensor) -> None:
        """After a prefill chunk (rows read tokens into `slots` from `starts`, `take` + 1 of them real; their final
        hidden [B, q, D]): the MTP module reads the same positions, pairs (hidden at t, token t + 1); a prompt read to
        its end gets its first drafts' logits. A row that ended at its first token has freed its slot, but nothing
        has taken it yet: its entries are written there all the same, as the prefix cache records that slot as
        holding the whole prompt (the last entry pairs the first token, or 0 after EOS: never reused, as a later
        request reads its last shared position again)."""
        q = hidden.shape[1]
        nxt = [r.prompt[s + 1:s + t + 2] + ([max(r.last, 0)] if not r.prefilling else [])  # -1: max_tokens 0, EOS
               for r, s, t in zip(rows, starts, take)]
        nxt = torch.tensor([n + [0] * (q - len(n)) for n in nxt], device=hidden.device)  # [B, q]
        dl, dh = self.s.runner.mtp(slots, nxt, hidden, torch.tensor(starts, device=hidden.device),
                                   torch.tensor(take, device=hidden.device), static=False)
        for i, r in enumerate(rows):
            if not r.prefilling and r.slot >= 0:  # a prompt read to its end: its first drafts
                r.draft_logits, r.draft_h = dl[i], dh[i]

    def forked(self, rows: list[Request], hidden: torch.Tensor) -> None:
        """Forks (OpenAI's n answers) that took their leader's cache entries and sampled their first token: the MTP
        module's entry at the prompt's last position pairs the leader's final hidden there (hidden [n, D]) with each
        fork's own token; their first drafts' logits."""
        dev = hidden.device
        at = torch.tensor([len(r.prompt) - 1 for r in rows], device=dev)
        dl, dh = self.s.runner.mtp([r.slot for r in rows], torch.tensor([[r.last] for r in rows], device=dev),
                                   hidden[:, None], at, torch.zeros(len(rows), dtype=torch.long, device=dev),
                                   static=False)
        for i, r in enumerate(rows):
            r.draft_logits, r.draft_h = dl[i], dh[i]

    def decode(self, rows: list[Request]) -> None:
        """One round for every generating row: k drafts from the MTP module, one main-model step over [last, drafts]
        (q = 1 + k), each row's kept tokens emitted one by one (a stop or EOS among them ends it there), then the
        MTP module catches up on the kept positions. While the policy says drafting does not pay (drafting.py) and
        no seeded sampled request runs, or rows are too near the context's end for k drafts, the step is a probe
        (`_probe_step`); beside a seeded sampled request, only those rows' step is."""
        t0 = time.perf_counter()
        near = [r for r in rows if r.length + 1 + self.k > self.s.max_len]  # no room for k drafts before the end
        # a seeded sampled request drafts every round: its draws (drafts, acceptances) then repeat from run to run,
        # which a mode set by other requests and timings would not. So where other rows are too near the context's
        # end, they take a plain step of their own and the rest still draft (as each would alone)
        seeded = any(r.params.seed is not None and r.params.temperature > 0 for r in rows if r not in near)
        if seeded and near:
            self._probe_step(near, t0, record=False)
            rows, near, t0 = [r for r in rows if r not in near], [], time.perf_counter()
        k = self.k if (self.policy.drafting or seeded) and not near else 0
        if k == 0:
            return self._probe_step(rows, t0)
        B, dev = len(rows), self.s.cache.kv.device
        behind = [r for r in rows if r.pending]
        if behind:  # drafting resumes: the MTP cache first catches up on the probe steps
            self._catch_up(behind)
        slots, starts = [r.slot for r in rows], torch.tensor([r.length for r in rows], device=dev)
        drafts = torch.zeros(B, k, dtype=torch.long, device=dev)
        p_draft: list[list[torch.Tensor]] = [[] for _ in rows]  # sampling rows: the drafter's distributions
        dl, dh = torch.stack([r.draft_logits for r in rows]), torch.stack([r.draft_h for r in rows])
        shaped = [b for b, r in enumerate(rows) if r.params.shapes]
        # the fused greedy round chooses inside one step: rows that shape their logits or ask for logprobs need them
        fused = all(r.params.temperature <= 0 and not r.params.shapes and r.params.logprobs is None for r in rows)
        for i in range(k):
            if shaped:  # drafted as the row samples: its bias, penalties and min_tokens (with the drafts before)
                dl = dl.float().clone()
                for b in shaped:
                    self.s.shape(rows[b], dl[b], drafts[b, :i].tolist())
            drafts[:, i] = dl.argmax(dim=-1)  # the greedy rows' drafts; sampled rows draw theirs below
            for b, r in enumerate(rows):
                if r.params.temperature > 0:
                    p_draft[b].append(probabilities(dl[b:b + 1], r.params.temperature, r.params.top_p)[0])
                    drafts[b, i] = draw(p_draft[b][-1][None], r.generator)[0]
            if i + 1 < k:  # chained: the module on its own output, one position further
                dl, dh = self.s.runner.mtp(slots, drafts[:, i:i + 1], dh[:, None], starts + i,
                                         torch.zeros(B, dtype=torch.long, device=dev))
        feed = torch.cat([torch.tensor([[r.last] for r in rows], device=dev), drafts], dim=1)  # [B, 1 + k]
        q = 1 + k
        lps: dict[tuple[int, int], tuple] = {}
        if fused:  # the whole round in one step, the MTP catch-up included, and one host read
            dl, choice_t, accepted_t, dh, _ = self.s.runner.round(slots, feed, [r.length for r in rows])
            kept = [row[:row[q] + 1] for row in torch.cat([choice_t, accepted_t[:, None]], dim=1).tolist()]
        else:
            logits, hidden = self.s.runner.verify(slots, feed, [r.length for r in rows])  # [B, q, V], [B, q, D]
            choice = logits.argmax(dim=-1).tolist()
            kept = []
            for b, r in enumerate(rows):
                p, target = r.params, logits[b]  # [q, V]: position j chooses the token after drafts[:j]
                if p.shapes:
                    target = torch.stack([self.s.shape(r, logits[b, j].float().clone(), drafts[b, :j].tolist())
                                          for j in range(q)])
                if p.temperature <= 0:
                    kept.append(accept_greedy(target.argmax(dim=-1).tolist() if p.shapes else choice[b],
                                              drafts[b].tolist()))
                else:
                    kept.append(accept_sampled(probabilities(target, p.temperature, p.top_p), drafts[b],
                                               p_draft[b] or None, r.generator))
            # the model's own log-probabilities of each kept token (position j's logits chose token j)
            lps = entries(logits.flatten(0, 1), [((b, j), b * q + j, tok, r.params.logprobs)
                                                 for b, r in enumerate(rows) if r.params.logprobs is not None
                                                 for j, tok in enumerate(kept[b])])
        self.drafted += k * B
        self.accepted += sum(len(t) - 1 for t in kept)
        now = time.perf_counter()
        for b, (r, toks) in enumerate(zip(rows, kept)):
            start = r.length
            for j, tok in enumerate(toks):  # `last` and the drafts before token j are in the cache, as plain decoding
                r.length = start + j + 1  # would have them when it chose token j
                if self.s.emit(r, tok, now, lps.get((b, j))):
                    break
        if not fused:
            nxt = torch.tensor([t[:q] + [0] * (q - len(t[:q])) for t in kept], device=dev)  # [B, q]
            n = torch.tensor([len(t) - 1 for t in kept], device=dev)
            dl, dh = self.s.runner.mtp(slots, nxt, hidden, starts, n)
        for b, r in enumerate(rows):
            if r.slot >= 0:  # still running: its next drafts
                r.draft_logits, r.draft_h = dl[b], dh[b]
        self.s.step_time = time.perf_counter() - t0
        self.policy.record(True, bucket(B), B, float(sum(len(t) - 1 for t in kept)), self.s.step_time)
        if self.s.observe:
            self.s.observe("step", (B, self.s.step_time))
            self.s.observe("drafts", (k * B, sum(len(t) - 1 for t in kept), self.policy.drafting))

    def _probe_step(self, rows: list[Request], t0: float, record: bool = True) -> None:
        """A plain step (q = 1) while drafting is off. Its (hidden, token) pairs wait in each request's `pending`;
        the MTP module catches up on them every `policy.probe_every` steps (one call over the missed positions, whose
        feed-forward runs at the last one only: ~1 MTP step, not one per step) and before drafting resumes. The
        rows whose MTP logits are current score the draft they would have made, for the policy (unless `record` is
        False: rows near the context's end stepped apart from a drafting round, not a plain step of the batch)."""
        B, dev = len(rows), self.s.cache.kv.device
        fresh = [b for b, r in enumerate(rows) if not r.pending]
        dl = torch.stack([rows[b].draft_logits for b in fresh]) if fresh else None
        feed = torch.tensor([[r.last] for r in rows], device=dev)  # [B, 1]
        logits, hidden = self.s.runner.verify([r.slot for r in rows], feed, [r.length for r in rows])  # [B, 1, V/D]
        landed = self._probe([rows[b] for b in fresh], dl, logits[fresh]) if fresh else 0.0
        toks, lps = self.s.choose(logits[:, 0], rows)  # as a plain step: shaped, sampled, logprobs
        now = time.perf_counter()
        hidden = hidden[:, 0].clone()  # [B, D]: a replayed step reuses its output buffer
        for b, r in enumerate(rows):
            if not r.pending:
                r.pending_at = r.length
            r.pending.append((hidden[b], toks[b]))
            r.length += 1
            self.s.emit(r, toks[b], now, lps.get(b))
        self.probe_steps += 1
        self.probes += 1
        if self.probe_steps >= self.policy.probe_every:
            self.probe_steps = 0
            self._catch_up([r for r in rows if r.slot >= 0 and r.pending])
        self.s.step_time = time.perf_counter() - t0
        if record:
            self.policy.record(False, bucket(B), len(fresh), landed, self.s.step_time)
        if self.s.observe:
            self.s.observe("step", (B, self.s.step_time))
            self.s.observe("drafts", (0, 0, self.policy.drafting))

    def _catch_up(self, rows: list[Request]) -> None:
        """The MTP cache over each request's pending pairs; rows grouped by how many they have (no padding)."""
        dev = self.s.cache.kv.device
        for n in sorted({len(r.pending) for r in rows}):
            group = [r for r in rows if len(r.pending) == n]
            tokens = torch.tensor([[t for _, t in r.pending] for r in group], device=dev)  # [G, n]
            hidden = torch.stack([torch.stack([h for h, _ in r.pending]) for r in group])  # [G, n, D]
            starts = torch.tensor([r.pending_at for r in group], device=dev)
            take = torch.full((len(group),), n - 1, dtype=torch.long, device=dev)
            dl, dh = self.s.runner.mtp([r.slot for r in group], tokens, hidden, starts, take, static=False)
            for i, r in enumerate(group):
                r.draft_logits, r.draft_h, r.pending = dl[i], dh[i], []

    @staticmethod
    def _probe(rows: list[Request], dl: torch.Tensor, logits: torch.Tensor) -> float:
        """A probe's score: how many rows' first drafts (from the MTP logits dl [B, V]) would have been accepted
        after this step's logits [B, 1, V], each at its own sampling settings (first_draft_lands)."""
        return float(sum(first_draft_lands(dl[b:b + 1], logits[b, :1], r.params.temperature, r.params.top_p)
                         for b, r in enumerate(rows)))
