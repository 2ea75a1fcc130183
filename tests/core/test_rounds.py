"""The acceptance rules of a speculative round (core/rounds.py), against their definitions: the greedy rule by
hand, rejection sampling by the distribution it must keep, a probe's score by a float64 computation."""

import torch

from dsv3.core.rounds import accept_greedy, accept_sampled, first_draft_lands


def test_greedy_keeps_the_agreeing_drafts_then_the_main_models_token():
    assert accept_greedy([7, 8, 9], [7, 8]) == [7, 8, 9]  # all agree: both, then the token after the last
    assert accept_greedy([7, 5, 9], [7, 8]) == [7, 5]  # the second disagrees: the first, then the main model's
    assert accept_greedy([4, 8, 9], [7, 8]) == [4]  # the first disagrees: nothing drafted survives
    assert accept_greedy([3], []) == [3]  # a plain step


def test_rejection_sampling_keeps_the_main_models_distribution():
    """A draft drawn from q, kept with probability min(1, p/q), else a draw from max(0, p - q): the token emitted
    first is distributed as p, however far q is from it (here total variation 0.45). 20000 draws: the empirical
    distribution's total variation from p is ~0.007 on average; the bound 0.02 is about 3x that, and keeping
    every draft (q's distribution) would read 0.45."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0], dtype=torch.float64)
    q = torch.tensor([0.05, 0.05, 0.1, 0.3, 0.5], dtype=torch.float64)
    p_main = torch.stack([p, torch.full((5,), 0.2, dtype=torch.float64)])  # [k + 1, V]: after x_L, after the draft
    counts = torch.zeros(5, dtype=torch.float64)
    n = 20000
    for _ in range(n):
        d = torch.multinomial(q, 1, generator=g)
        counts[accept_sampled(p_main, d, [q], g)[0]] += 1
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < 0.02, f"total variation {tv:.4f} from the main model's distribution (counts {counts.tolist()})"
    assert counts[4] == 0, "a token the main model gives probability 0 was emitted"


def test_a_probe_scores_the_first_draft_as_acceptance_would():
    """first_draft_lands: greedy, 1 where the draft's argmax is the main model's; sampling, the probability that
    a draft sampled from q is kept by rejection sampling against p, sum(min(p, q)) (computed here in float64),
    at temperature 0.7 with a top-p nucleus of 0.9 applied to both."""
    g = torch.Generator().manual_seed(0)
    main, draft = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    draft[1] = main[1] * 3  # the same argmax
    want = (draft.argmax(-1) == main.argmax(-1)).float()
    assert torch.equal(first_draft_lands(draft, main, 0.0, 1.0), want) and want[1] == 1

    def nucleus(logits):
        p = (logits.double() / 0.7).softmax(-1)
        order = p.argsort(-1, descending=True)
        keep = torch.zeros_like(p, dtype=torch.bool)
        for b in range(p.shape[0]):
            total = 0.0
            for i in order[b].tolist():  # the smallest set of top tokens whose mass reaches 0.9
                keep[b, i] = True
                total += float(p[b, i])
                if total >= 0.9:
                    break
        p = p * keep
        return p / p.sum(-1, keepdim=True)
    expected = torch.minimum(nucleus(main), nucleus(draft)).sum(-1)
    got = first_draft_lands(draft, main, 0.7, 0.9).double()
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
