"""The judge itself must be able to fail: its count tests against exact binomial sums, each bar on crafted logits."""

from __future__ import annotations

import pytest
import torch
from judge import assert_no_worse, miss_p_value, rel_err


def test_p_value_is_the_binomial_tail():
    # 2 of 3 total misses with p = 0.6: P(X >= 2) = 3 * 0.36 * 0.4 + 0.216
    assert miss_p_value(2, 1) == pytest.approx(3 * 0.36 * 0.4 + 0.216)
    assert miss_p_value(0, 7) == pytest.approx(1.0)


def test_one_flip_passes_a_real_regression_fails():
    assert miss_p_value(8, 4) > 0.1  # the AMX case of issue 16: 8 vs 4 misses of 256
    assert miss_p_value(40, 8) < 1e-3  # five times the peer's misses


def logits_with_misses(ref: torch.Tensor, k: int) -> torch.Tensor:
    """ref + noise that dominates the relative error, with exactly k positions' argmax moved."""
    out = ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(k))
    rows = out.view(-1, out.shape[-1])
    for i in range(k):  # the runner-up of the first k positions edges past the top: a miss, a tiny error
        top2 = rows[i].topk(2)
        rows[i, top2.indices[1]] = top2.values[0] + 1e-3
    for i in range(k, rows.shape[0]):  # the noise must not move any other argmax
        rows[i, ref.view(rows.shape)[i].argmax()] += 1.0
    return out


def test_assert_no_worse_fails_on_many_more_misses():
    ref = torch.randn(4, 64, 50, generator=torch.Generator().manual_seed(0))
    peer = logits_with_misses(ref, 4)
    assert_no_worse(logits_with_misses(ref, 8), peer, ref, "8 vs 4")
    with pytest.raises(AssertionError, match="top-1 misses"):
        assert_no_worse(logits_with_misses(ref, 40), logits_with_misses(ref, 6), ref, "40 vs 6")


def test_a_few_flipped_positions_pass_a_broad_or_frequent_error_fails():
    ref = torch.randn(2, 160, 64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)

    def noisy(scale: float, flips: int) -> torch.Tensor:
        out = ref + scale * torch.randn(ref.shape, generator=g)
        rows = out.view(-1, out.shape[-1])
        rows[torch.randperm(rows.shape[0], generator=g)[:flips]] = torch.randn(flips, out.shape[-1], generator=g)
        return out

    peer, ours = noisy(0.01, 4), noisy(0.01, 12)
    assert rel_err(ours, ref) > 1.5 * rel_err(peer, ref)  # the whole-tensor norm would call this worse
    assert_no_worse(ours, peer, ref, "12 vs 4 flipped positions")
    with pytest.raises(AssertionError, match="typical relative error"):
        assert_no_worse(noisy(0.02, 4), peer, ref, "twice the error everywhere")
    with pytest.raises(AssertionError, match="outlier positions"):
        assert_no_worse(noisy(0.01, 30), peer, ref, "30 vs 4 flipped positions")
