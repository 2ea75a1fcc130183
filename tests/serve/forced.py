"""Drafts forced right or wrong in a drafting scheduler (the tests' and the tensor-parallel worker's)."""

from __future__ import annotations

import torch


def force_drafts(s, want: dict, right: bool):
    """Patch the scheduler's MTP calls (the catch-up, and the greedy round that includes it): the module still runs
    (its cache fills as it would), but each row's draft logits are replaced by a certainty on the token the main
    model will choose there (right) or on another one."""
    real_mtp, real_round = s.runner.mtp, s.runner.round

    def force(dl, slots, positions, take):
        for b, slot in enumerate(slots):
            r = next((r for r in s.active if r.slot == slot), None)
            j = int(positions[b] + take[b]) + 2 - len(r.prompt) if r is not None else -1  # the drafted token's index
            if 0 <= j < len(want[r.id]):
                tok = want[r.id][j] if right else (want[r.id][j] + 1) % dl.shape[-1]
                dl[b] = float("-inf")
                dl[b, tok] = 0.0

    @torch.inference_mode()
    def mtp(slots, tokens, hidden, positions, take, static=True):
        dl, dh = real_mtp(slots, tokens, hidden, positions, take, static)
        force(dl, slots, positions, take)
        return dl, dh

    @torch.inference_mode()
    def round_(slots, tokens, positions):
        dl, choice, accepted, dh, total = real_round(slots, tokens, positions)
        force(dl, slots, positions, accepted)
        return dl, choice, accepted, dh, total
    s.runner.mtp, s.runner.round = mtp, round_
