"""The aux-loss-free group-limited gate against a few-line computation of the reference formulas."""

from __future__ import annotations

import torch

from dsv3.backends.reference import ReferenceKernels
from dsv3.core.kernels import GateParams

K = ReferenceKernels()


def params(**kw):
    base = dict(top_k=2, n_group=4, topk_group=2, scoring_func="sigmoid", group_score="top2_sum",
                norm_topk_prob=True, route_scale=2.5)
    base.update(kw)
    return GateParams(**base)


def formula(logits, bias, top_k, n_group, topk_group, route_scale):
    """Straight from the reference: one token at a time, plain Python loops, float64."""
    out_w, out_ids = [], []
    for row in logits.double():
        s = row.sigmoid()
        sb = s + bias.double()
        per = len(s) // n_group
        gscore = [sorted(sb[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_group)]
        gscore = [sum(v) for v in gscore]
        kept = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cand = [(sb[e].item() if e // per in kept else float("-inf"), e) for e in range(len(s))]
        ids = [e for _, e in sorted(cand, key=lambda c: -c[0])[:top_k]]
        w = torch.stack([s[e] for e in ids])
        out_w.append(w / w.sum() * route_scale)
        out_ids.append(ids)
    return torch.stack(out_w), torch.tensor(out_ids)


def run_gate(logits, bias, p):
    # the gate computes x Wᵀ: identity weights make x the logits
    E = logits.shape[1]
    return K.moe_gate(logits, torch.eye(E), bias, p)


def test_dropped_group_containing_highest_raw_score_is_never_chosen():
    # 8 experts, 4 groups of 2. Expert 0 has by far the highest raw score, but its group's
    # top-2 sum (with its negative-biased partner) is lowest; the other groups tie higher.
    logits = torch.tensor([[6.0, -6.0, 1.0, 1.0, 0.9, 0.9, 0.8, 0.8]])
    bias = torch.tensor([0.0, -0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    w, ids = run_gate(logits, bias, params(top_k=2, topk_group=2))
    s = logits.sigmoid()[0]
    # group scores: g0 = s0 + s1 - 0.9 ≈ 0.998 + 0.002 - 0.9 = 0.10; g1 = 2·0.731; g2 = 2·0.711; g3 = 2·0.690
    assert sorted(ids[0].tolist()) == [2, 3]
    expected = torch.stack([s[2], s[3]]) / (s[2] + s[3]) * 2.5
    torch.testing.assert_close(w[0].sort().values, expected.sort().values)


def test_negative_bias_with_zero_mask_would_pick_dropped_group():
    # All selection scores negative: masking dropped groups with 0 instead of -inf would select them.
    logits = torch.full((1, 8), -8.0)
    logits[0, 0] = -7.0  # in group 0
    bias = torch.full((8,), -0.5)
    bias[4:6] = -0.4  # group 2 wins the group stage
    bias[6:8] = -0.45  # group 3 second
    w, ids = run_gate(logits, bias, params(top_k=2, topk_group=2))
    assert set(ids[0].tolist()) <= {4, 5, 6, 7}, ids


def test_weights_come_from_unbiased_scores():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0])  # steers the choice to expert 0 without weighting it
    w, ids = run_gate(logits, bias, params(top_k=2, n_group=1, topk_group=1, route_scale=1.0))
    assert ids[0].tolist()[0] == 0 and set(ids[0].tolist()) == {0, 3}
    s = logits.sigmoid()[0]
    torch.testing.assert_close(w[0], torch.stack([s[0], s[3]]) / (s[0] + s[3]))


def test_random_cases_match_formula():
    g = torch.Generator().manual_seed(0)
    for n_group, topk_group, top_k, E in [(4, 2, 3, 16), (8, 4, 8, 64), (3, 1, 2, 12), (1, 1, 4, 10)]:
        logits = torch.randn(20, E, generator=g) * 2
        bias = torch.randn(E, generator=g) * 0.3 - 0.2
        w, ids = run_gate(logits, bias, params(top_k=top_k, n_group=n_group, topk_group=topk_group))
        w_ref, ids_ref = formula(logits, bias, top_k, n_group, topk_group, 2.5)
        for t in range(20):
            order, order_ref = ids[t].argsort(), ids_ref[t].argsort()
            assert ids[t][order].tolist() == ids_ref[t][order_ref].tolist(), (n_group, t)
            torch.testing.assert_close(w[t][order].double(), w_ref[t][order_ref], rtol=1e-5, atol=1e-6)
