"""When the server drafts (`dsv3 serve --speculative mtp`): an adaptive off-switch for the whole running batch.

A drafting round verifies 1 + k tokens per request and gains the drafts it accepts; it costs `cost` plain steps
(about 1.0-1.1 on a GPU at small batch, 1.4-2 on a CPU, where a step costs its weight bytes). Drafting pays while
the accepted drafts per request and round exceed cost - 1. A drafter that stops landing (a fine-tuned main model
with the original MTP layer, text unlike its training) would otherwise slow every stream.

While not drafting, the server probes: plain steps (q = 1), with the MTP module catching up on the positions they
made every `probe_every` steps (its cache must keep up for drafting to resume; one call over the missed positions,
whose feed-forward runs at the last only), and the draft it then makes scored against the token the main model
picks next. A catch-up costs about half a plain step, so while the probes keep saying drafting would not pay, they
come half as often each time (PROBE_EVERY, 2x, ... PROBE_MAX steps apart: ~6% of the plain steps' time, then under
1%); a probe that says it might pay brings the interval back. Both modes are timed per batch bucket, so `cost` is
measured, not assumed. Decisions come at most every WINDOW steps, with a margin against flapping: from a moving
average of the accepted drafts while drafting, from the probes scored since drafting stopped (at least MIN_SCORED)
while not.
"""

from __future__ import annotations

#: steps in a mode before the next decision; moving-average weight of the newest step; the margin (in accepted
#: drafts per request and round) a switch must clear; the cost of a round in plain steps until both are measured
WINDOW, ALPHA, MARGIN, DEFAULT_COST = 8, 0.25, 0.05, 1.25
#: while not drafting, the MTP module catches up on the main model's positions every this many steps (one call), up
#: to PROBE_MAX apart while the probes say drafting would not pay; drafting resumes only on at least MIN_SCORED scored
#: drafts since it stopped
PROBE_EVERY, PROBE_MAX, MIN_SCORED = 8, 64, 4


class DraftPolicy:
    """`drafting`: whether the next step drafts. `record` each step; it switches the mode when the other pays."""

    def __init__(self, draft_tokens: int):
        self.k = draft_tokens
        self.drafting = True
        self.since = 0  # steps in the current mode
        self.accepted: float | None = None  # accepted drafts per request and round (drafting)
        self.scored = 0.0  # drafts scored by probes since drafting stopped ...
        self.landed = 0.0  # ... and how many would have landed
        self.probe_every = PROBE_EVERY  # plain steps between the MTP module's catch-ups while not drafting
        self.seconds: dict[bool, dict[int, float]] = {True: {}, False: {}}  # mode -> batch bucket -> step time

    def cost(self, bucket: int) -> float:
        """A drafting round's time in plain (probe) steps at this batch bucket (or the nearest measured one)."""
        both = [b for b in self.seconds[True] if b in self.seconds[False]]
        if not both:
            return DEFAULT_COST
        b = min(both, key=lambda b: abs(b - bucket))
        return self.seconds[True][b] / self.seconds[False][b]

    def gain(self) -> float | None:
        """Accepted drafts per request and round, as measured (drafting) or as the probes predict (predicted)."""
        if self.drafting:
            return self.accepted
        return None if self.hit is None else self.predicted(self.hit)

    def predicted(self, hit: float) -> float:
        """Accepted drafts per request and round at a first-draft hit rate: draft i lands only if the ones before it
        did, so h + h^2 + ... + h^k."""
        return sum(hit ** i for i in range(1, self.k + 1))

    @property
    def hit(self) -> float | None:
        """The share of scored probes whose first draft would have landed, since drafting stopped (None: too few)."""
        return self.landed / self.scored if self.scored >= MIN_SCORED else None

    def record(self, drafted: bool, bucket: int, rows: int, landed: float, seconds: float) -> None:
        """One step: drafted (a round of `rows` requests; `landed` = drafts accepted) or a probe (`rows` = the
        requests whose draft was scored, maybe none; `landed` = those whose draft would have landed, or their
        probability when sampling); its time in seconds."""
        times = self.seconds[drafted]
        times[bucket] = seconds if bucket not in times else (1 - ALPHA) * times[bucket] + ALPHA * seconds
        if drafted:
            rate = landed / max(rows, 1)
            self.accepted = rate if self.accepted is None else (1 - ALPHA) * self.accepted + ALPHA * rate
        else:  # a probe step scores only the rows whose drafter had caught up (maybe none)
            self.scored, self.landed = self.scored + rows, self.landed + landed
            if rows:  # the step after a catch-up: the next one comes later while drafting would not pay
                pays = self.predicted(landed / rows) > self.cost(bucket) - 1 - MARGIN
                self.probe_every = PROBE_EVERY if pays else min(2 * self.probe_every, PROBE_MAX)
        if drafted != self.drafting:  # a step of the other mode (a round near the context's end is a probe)
            return
        self.since += 1
        gain = self.gain()
        if self.since < WINDOW or gain is None:
            return
        need = self.cost(bucket) - 1
        if (gain < need - MARGIN) if self.drafting else (gain > need + MARGIN):
            self.drafting, self.since = not self.drafting, 0
            self.scored = self.landed = 0.0
            self.probe_every = PROBE_EVERY
