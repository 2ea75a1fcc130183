"""A drafting scheduler on every rank (run under torchrun by test_speculation.py, and alone for the reference):
rank 0 schedules and drafts, the others follow its plans. Drafting is held on and the drafts forced right for
the greedy rows, so rounds keep more than one token; rank 0 saves what each request got."""

import sys
import threading
from collections import defaultdict
from pathlib import Path

import torch

import dsv3
from dsv3.serve.drafting import DraftPolicy
from dsv3.serve.scheduler import Request, Sampling, Scheduler
from dsv3.serve.text import TextStream

sys.path.insert(0, str(Path(__file__).parent))
from forced import force_drafts  # noqa: E402

ckpt, out_path = sys.argv[1], sys.argv[2]
engine = dsv3.load(ckpt, backend="cpu", dtype="fp32")
prompts = {"a": [3, 14, 15, 92, 65], "b": [(3 * i) % 400 + 1 for i in range(37)], "c": [2, 71, 82]}
want = {rid: engine.generate([p], max_new_tokens=10)[0] for rid, p in prompts.items()}  # every rank: collective
turn = prompts["a"] + want["a"] + [7, 8]  # the next turn of "a"'s conversation
want["turn"] = engine.generate([turn], max_new_tokens=6)[0]
want["lead"] = want["fork1"] = want["b"][:6]
DraftPolicy.record = lambda self, *a: setattr(self, "drafting", True)
s = Scheduler(engine, max_batch=4, prefill_chunk=8, eos_ids=(), speculative="mtp", draft_tokens=2)
if engine.par.rank > 0:
    s.runner.follow()
    sys.exit(0)

force_drafts(s, defaultdict(list, want), True)  # the greedy rows' drafts right (the others' as the layer makes them)
got, done = {}, threading.Semaphore(0)


def request(rid, prompt, params, leader=None):
    got[rid] = {"tokens": [], "logprobs": []}

    def emit(kind, data):
        if kind == "text":
            got[rid]["tokens"] += data[1]
            got[rid]["logprobs"] += [e[1] for e in data[2] or []]
        elif kind == "prompt":  # the prompt's entries (the first token's has none)
            got[rid]["logprobs"] += [e[1] for e in data if e[1] is not None]
        elif kind in ("done", "error"):
            got[rid]["end"] = data
            done.release()
    r = Request(rid, prompt, params, emit, TextStream(engine.tokenizer.decode))
    r.leader = leader
    return r


s.start()
try:
    batch = [request(rid, p, Sampling(10, logprobs=1 if rid == "b" else None)) for rid, p in prompts.items()]
    batch.append(request("sampled", prompts["c"], Sampling(10, temperature=0.8, seed=3, frequency_penalty=0.5)))
    batch.append(request("scored", list(range(1, 40)), Sampling(2, logprobs=0, prompt_logprobs=True)))
    s.submit(*batch)
    for _ in batch:
        assert done.acquire(timeout=120), s.error
    # the next turn (the prefix cache, both caches), and n = 3 answers of one prompt (copies on every rank)
    lead = request("lead", prompts["b"], Sampling(6))
    more = [request("turn", turn, Sampling(6)), lead, request("fork1", prompts["b"], Sampling(6), lead),
            request("fork2", prompts["b"], Sampling(6, temperature=1.0, seed=9), lead)]
    s.submit(*more)
    for _ in more:
        assert done.acquire(timeout=120), s.error
    got["drafts"] = (s.spec.drafted, s.spec.accepted)
    got["world"] = engine.par.world_size
finally:
    s.shutdown()
torch.save({"got": got, "want": want}, out_path)
