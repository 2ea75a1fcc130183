"""The server's adaptive off-switch for drafting: decisions from measured acceptance and measured step costs."""

from __future__ import annotations

import pytest

from dsv3.serve import drafting
from dsv3.serve.drafting import DraftPolicy


def run(policy: DraftPolicy, steps: int, landed_per_row: float, round_s: float, probe_s: float, rows: int = 4):
    for _ in range(steps):
        drafted = policy.drafting
        policy.record(drafted, 4, rows, landed_per_row * rows, round_s if drafted else probe_s)


def test_drafts_that_do_not_land_turn_drafting_off_after_a_window():
    p = DraftPolicy(1)
    run(p, drafting.WINDOW - 1, 0.0, 1.3, 1.0)
    assert p.drafting, "decided before a window of rounds"
    run(p, 1, 0.0, 1.3, 1.0)
    assert not p.drafting


@pytest.mark.parametrize("round_s, accepted, on", [(2.0, 0.8, False), (2.0, 1.0 + 2 * drafting.MARGIN, True),
                                                   (1.1, 0.2, True), (1.1, 0.02, False)])
def test_the_break_even_is_the_measured_cost_of_a_round(round_s, accepted, on):
    """A round costing 2 plain steps needs > 1 accepted draft per request (k = 2); one costing 1.1 needs > 0.1.
    The cost is measured: a spell of probes (drafts that never land) times the plain step first."""
    p = DraftPolicy(2)
    run(p, drafting.WINDOW + 2, 0.0, round_s, 1.0)  # a window of rounds, then probes
    assert not p.drafting and p.cost(4) == pytest.approx(round_s)
    p.drafting, p.since = True, 0  # drafting again, now with both step times known
    run(p, 3 * drafting.WINDOW, accepted, round_s, 1.0)
    assert p.drafting == on, (p.accepted, p.cost(4))


def test_probes_that_would_land_turn_drafting_back_on():
    """While probing, a first-draft hit rate h predicts h + h^2 accepted drafts per round at k = 2; no decision on
    fewer than MIN_SCORED scored drafts (probes score only the rows whose drafter has caught up)."""
    p = DraftPolicy(2)
    run(p, drafting.WINDOW, 0.0, 1.5, 1.0)
    assert not p.drafting
    p.record(False, 4, 0, 0.0, 1.0)  # a probe that scored nothing
    p.record(False, 4, drafting.MIN_SCORED - 1, (drafting.MIN_SCORED - 1) / 2, 1.0)
    assert p.hit is None and p.gain() is None
    run(p, drafting.WINDOW - 3, 0.5, 1.5, 1.0)
    assert not p.drafting and p.gain() == pytest.approx(0.75, abs=0.1)  # 0.75 > 1.5 - 1 + MARGIN: next decision
    run(p, 1, 0.5, 1.5, 1.0)
    assert p.drafting and p.since == 0


def test_the_cost_comes_from_the_nearest_measured_bucket_or_a_default():
    p = DraftPolicy(1)
    assert p.cost(8) == drafting.DEFAULT_COST
    p.seconds = {True: {1: 1.2, 16: 3.0}, False: {1: 1.0, 16: 2.0}}
    assert p.cost(2) == pytest.approx(1.2) and p.cost(12) == pytest.approx(1.5)


def test_probes_that_keep_missing_come_less_often_and_one_that_lands_brings_them_back():
    """A catch-up costs about half a plain step: while the probes say drafting would not pay, the interval between
    them doubles up to PROBE_MAX; a probe that says it would pay, or a switch of mode, sets it back."""
    p = DraftPolicy(1)
    run(p, drafting.WINDOW, 0.0, 1.5, 1.0)  # drafting off: a round costs 1.5 plain steps, so h > 0.5 pays
    assert not p.drafting and p.probe_every == drafting.PROBE_EVERY
    p.record(False, 4, 0, 0.0, 1.0)  # a probe step that scored nothing (no catch-up before it) changes nothing
    assert p.probe_every == drafting.PROBE_EVERY
    seen = []
    for _ in range(6):
        p.record(False, 4, 4, 0.0, 1.0)  # four rows scored, none landed
        seen.append(p.probe_every)
    assert seen == [16, 32, 64, 64, 64, 64] and drafting.PROBE_MAX == 64, seen
    p.record(False, 4, 4, 1.0, 1.0)  # h = 0.25 < 0.5: still not worth it
    assert p.probe_every == drafting.PROBE_MAX
    p.record(False, 4, 4, 3.0, 1.0)  # h = 0.75: it might pay, look again soon
    assert p.probe_every == drafting.PROBE_EVERY
    p.record(False, 4, 4, 0.0, 1.0)
    p.drafting, p.since = True, 0
    run(p, drafting.WINDOW, 0.0, 1.5, 1.0)  # drafting on, then off again: probes start at the short interval
    assert not p.drafting and p.probe_every == drafting.PROBE_EVERY
