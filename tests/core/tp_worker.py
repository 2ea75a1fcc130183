"""Run under torchrun by test_parallel.py: logits and greedy tokens on fixed inputs; rank 0 saves them."""

import os
import sys

import torch

import dsv3

ckpt, out_path = sys.argv[1], sys.argv[2]
die_rank = int(os.environ.get("TP_TEST_KILL_RANK", "-1"))
engine = dsv3.load(ckpt, backend="cpu", dtype="fp32")
ids = torch.randint(0, engine.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
logits = engine.logits(ids)
if engine.par.rank == die_rank:
    os._exit(9)  # a rank that dies mid-run: the others must not hang
tokens = engine.generate([ids[0].tolist(), ids[1, :5].tolist()], max_new_tokens=8)
mtp = engine.mtp_logits(ids) if engine.has_mtp else None
if engine.par.rank == 0:
    torch.save({"logits": logits, "tokens": tokens, "mtp": mtp, "world": engine.par.world_size}, out_path)
