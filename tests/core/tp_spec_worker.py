"""Run under torchrun by test_parallel.py (and alone, for the reference): MTP speculative decoding, greedy and
sampled, drafting held on (the random MTP layer's drafts) and with perfect drafts; every rank saves its tokens."""

import sys

import torch

import dsv3
from dsv3.core.speculative import speculative_generate

ckpt, out_path = sys.argv[1], sys.argv[2]
engine = dsv3.load(ckpt, backend="cpu", dtype="fp32")
prompts = [[5, 9, 2, 44], [(3 * i) % 400 + 1 for i in range(13)]]
plain = engine.generate(prompts, max_new_tokens=10)
model, eos = engine.model, tuple(engine.cfg.eos_token_ids)


def perfect(rows, length, out):  # the plain run's next tokens (k = 2)
    return torch.tensor([[(plain[b] + [0, 0, 0])[len(out[b]) + i] for i in range(2)] for b in range(len(out))])


got = {"plain": plain, "world": engine.par.world_size}
for k in (1, 2):
    got[f"greedy-k{k}"] = speculative_generate(model, prompts, 10, k, eos_ids=eos, adaptive=False)[0]
got["adaptive"] = engine.generate(prompts, max_new_tokens=10, speculative="mtp")
got["perfect"], stats = speculative_generate(model, prompts, 10, 2, eos_ids=eos, drafter=perfect)
got["perfect-accepted"] = stats.extra["acceptance"]
# rank 0 seeded as one process is, the other ranks otherwise: the draws that count are rank 0's
seed = 5 if engine.par.rank == 0 else 50 + engine.par.rank
got["sampled"] = speculative_generate(model, prompts, 10, 2, temperature=0.9, eos_ids=eos, seed=seed,
                                      adaptive=False)[0]
torch.save(got, f"{out_path}.{engine.par.rank}")
