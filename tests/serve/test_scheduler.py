"""The scheduler without HTTP: chunked prefill interleaves, and what it computes is each prompt alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import make
from forced import force_drafts

from dsv3.serve.runner import PREFILL, PREFILL_SCORED
from dsv3.serve.scheduler import QueueFull, Request, Sampling, Scheduler
from dsv3.serve.text import TextStream


def test_a_short_prompt_is_not_stuck_behind_a_long_one(engine):
    s = Scheduler(engine, max_batch=4, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids))
    s.start()
    try:
        done = threading.Semaphore(0)
        long_prompt = [(7 * i) % 500 + 1 for i in range(400)]  # 25 chunks of 16
        short = [3, 1, 4, 1, 5]
        a = make(engine, long_prompt, 6, done)
        s.submit(a)
        while a.length == 0:  # its prefill has begun
            time.sleep(0.001)
        b = make(engine, short, 6, done)
        s.submit(b)
        done.acquire()
        done.acquire()
        assert b.first_token_at < a.first_token_at, "the short request waited for the whole long prefill"
        assert a.tokens == engine.generate([long_prompt], max_new_tokens=6)[0]  # 25 chunks, one answer
        assert b.tokens == engine.generate([short], max_new_tokens=6)[0]
        assert s.stats() == {"running": 0, "waiting": 0, "slots_used": 0}
    finally:
        s.shutdown()


def test_the_waiting_queue_is_bounded(engine):
    s = Scheduler(engine, max_batch=1, max_waiting=2)  # not started: nothing leaves the queue
    for i in range(2):
        s.submit(Request(str(i), [1, 2], Sampling(4), lambda *a: None, TextStream(engine.tokenizer.decode)))
    try:
        s.submit(Request("x", [1, 2], Sampling(4), lambda *a: None, TextStream(engine.tokenizer.decode)))
    except QueueFull as e:
        assert "--max-waiting 2" in str(e)
    else:
        raise AssertionError("a third request was queued past --max-waiting 2")


def test_requests_submitted_together_queue_all_or_none(engine):
    s = Scheduler(engine, max_batch=1, max_waiting=3)  # not started: nothing leaves the queue
    reqs = [Request(str(i), [1, 2], Sampling(4), lambda *a: None, TextStream(engine.tokenizer.decode)) for i in range(4)]
    s.submit(reqs[0])
    with pytest.raises(QueueFull, match="3 more asked"):
        s.submit(*reqs[1:])
    assert s.stats()["waiting"] == 1 and s.inbox.qsize() == 1  # none of the three was queued
    s.submit(*reqs[1:3])
    assert s.stats()["waiting"] == 3


@pytest.mark.parametrize("drafts", ["as trained", "perfect", "always wrong"])
@pytest.mark.parametrize("k", [1, 2])
def test_speculative_decoding_in_the_batch_gives_each_prompt_its_own_tokens(engine, drafts, k):
    """--speculative mtp: rows of different lengths, joining at different times, accept different numbers of drafts
    per step (all, none, or what a random MTP layer lands); fp32 greedy tokens equal each prompt run alone, EOS
    and max_tokens inside an accepted run included."""
    prompts = [[5, 9, 2], [(3 * i) % 400 + 1 for i in range(37)], [7] * 12, [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    max_tokens = [9, 14, 5, 11]
    want = {str(len(p)): engine.generate([p], max_new_tokens=m)[0] for p, m in zip(prompts, max_tokens)}
    s = Scheduler(engine, max_batch=3, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids),
                  speculative="mtp", draft_tokens=k)
    if drafts != "as trained":
        force_drafts(s, want, drafts == "perfect")
    s.start()
    try:
        done = threading.Semaphore(0)
        reqs = []
        for p, m in zip(prompts, max_tokens):
            reqs.append(make(engine, p, m, done))
            s.submit(reqs[-1])
            time.sleep(0.01)
        for _ in reqs:
            assert done.acquire(timeout=120), f"a request never finished (the model loop: {s.error!r})"
        assert s.error is None, s.error
        for r in reqs:
            assert r.tokens == want[r.id], f"prompt of {len(r.prompt)} tokens, {drafts} drafts, k={k}"
        if drafts == "perfect":
            assert s.spec.accepted > 0.8 * s.spec.drafted, f"{s.spec.accepted} of {s.spec.drafted} perfect drafts accepted"
        if drafts == "always wrong":
            assert s.spec.accepted == 0 and s.spec.drafted > 0
        assert s.stats() == {"running": 0, "waiting": 0, "slots_used": 0}
    finally:
        s.shutdown()


@pytest.mark.parametrize("every", [2, 12], ids=["alternating", "long-probing"])
@pytest.mark.parametrize("k", [1, 2])
def test_drafting_switched_on_and_off_between_steps_keeps_each_prompts_tokens(engine, monkeypatch, k, every):
    """The adaptive switch may change the mode between any two steps: one drafting round in `every` steps, probes
    (plain steps; the MTP cache catches up every PROBE_EVERY of them and before drafting resumes) the others; fp32
    greedy tokens still equal each prompt alone, and both kinds of step ran."""
    from dsv3.serve.drafting import DraftPolicy

    modes = []

    def flip(self, drafted, bucket, rows, landed, seconds):
        modes.append(drafted)
        self.drafting = len(modes) % every == 0
    monkeypatch.setattr(DraftPolicy, "record", flip)
    s = Scheduler(engine, max_batch=3, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids),
                  speculative="mtp", draft_tokens=k)
    got = serve_all(s, engine, staggered=True)
    for p, m in zip(PROMPTS, MAX_TOKENS):
        assert got[str(len(p))] == engine.generate([p], max_new_tokens=m)[0], f"prompt of {len(p)} tokens"
    assert True in modes and False in modes


@pytest.mark.parametrize("resume", [False, True], ids=["probing", "drafting-resumes"])
def test_probe_steps_leave_the_mtp_cache_of_a_plain_run(engine, monkeypatch, resume):
    """Drafting off from the start: probe steps leave their (hidden, token) pairs pending and the MTP module
    catches up every PROBE_EVERY steps (and, with `resume`, when drafting comes back after PROBE_EVERY + 3 steps):
    the MTP cache's entries up to the last catch-up equal a plain forward over the request's tokens (greedy
    tokens cannot tell: the main model verifies whatever is drafted)."""
    from dsv3.core.model import LatentCache
    from dsv3.serve.drafting import PROBE_EVERY, DraftPolicy

    steps = []

    def policy(self, drafted, bucket, rows, landed, seconds):
        steps.append(drafted)
        self.drafting = resume and len(steps) == PROBE_EVERY + 3
    monkeypatch.setattr(DraftPolicy, "record", policy)
    s = Scheduler(engine, max_batch=1, eos_ids=(), speculative="mtp")
    s.spec.policy.drafting = False
    prompt, new = [5, 9, 2, 7, 11], PROBE_EVERY + 6
    done = threading.Semaphore(0)
    r = make(engine, prompt, new, done)
    s.submit(r)
    s.start()
    try:
        assert done.acquire(timeout=60)
    finally:
        s.shutdown()
    assert r.tokens == engine.generate([prompt], max_new_tokens=new)[0]
    written = len(prompt) + (PROBE_EVERY + 3 if resume else PROBE_EVERY)  # positions the MTP cache caught up on
    assert (True in steps) == resume
    m, seq = engine.model, prompt + r.tokens
    with torch.inference_mode():
        main = LatentCache.allocate(m.cfg, len(m.layers), 1, len(seq), torch.float32, "cpu")
        mtp = LatentCache.allocate(m.cfg, 1, 1, len(seq), torch.float32, "cpu")
        zero = torch.zeros(1, dtype=torch.long)
        _, h = m.forward_step(torch.tensor([seq[:written]]), zero, main, written)
        m.mtp_step(torch.tensor([seq[1:written + 1]]), h, zero, mtp, written, take=torch.tensor([written - 1]))
    for got, want, what in ((s.spec.cache.kv, mtp.kv, "kv"), (s.spec.cache.pe, mtp.pe, "pe")):
        err = (got[:, 0, :written] - want[:, 0, :written]).abs().max().item()
        assert err < 1e-4, f"MTP cache {what}: entries 0..{written - 1} differ from a plain run by {err:.2e}"


def test_drafts_that_never_land_turn_drafting_off_but_seeded_sampling_drafts(engine, monkeypatch):
    """The demo's random MTP layer lands nothing: after a window of rounds the server only probes (the greedy
    tokens unchanged); a seeded sampled request still drafts, so its draws repeat whatever the switch says."""
    from dsv3.serve import drafting

    # a round's cost in plain steps, pinned: measured on a busy 2-core machine it came out under 1 + MARGIN once,
    # and then a probe whose draft missed still said drafting would pay (test_drafting.py tests the measuring)
    monkeypatch.setattr(drafting.DraftPolicy, "cost", lambda self, bucket: 1.5)
    s = Scheduler(engine, max_batch=2, eos_ids=(), speculative="mtp")
    done = threading.Semaphore(0)
    prompt = [5, 9, 2, 7]
    greedy = make(engine, prompt, 3 * drafting.WINDOW, done)
    s.submit(greedy)
    s.start()
    try:
        assert done.acquire(timeout=120)
        assert not s.spec.policy.drafting and s.spec.drafted == drafting.WINDOW, (s.spec.policy.drafting, s.spec.drafted)
        assert s.spec.policy.probe_every > drafting.PROBE_EVERY  # the probes missed: they come less often
        assert greedy.tokens == engine.generate([prompt], max_new_tokens=3 * drafting.WINDOW)[0]
        runs = []
        for _ in range(2):
            r = make(engine, prompt, 6, done)
            r.params = Sampling(6, temperature=1.0, seed=3)
            before = s.spec.drafted
            s.submit(r)
            assert done.acquire(timeout=120)
            runs.append(r.tokens)
            assert s.spec.drafted > before, "a seeded sampled request did not draft"
        assert runs[0] == runs[1]
    finally:
        s.shutdown()


def test_speculative_serving_needs_an_mtp_layer(demo_ckpt):
    import dsv3
    from dsv3.core.errors import DsvError

    plain = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32", with_mtp=False)
    with pytest.raises(DsvError, match="needs the checkpoint's MTP layer"):
        Scheduler(plain, max_batch=1, speculative="mtp")


def test_a_dead_model_loop_refuses_new_requests(engine):
    """After the model loop failed, submit says so at once instead of queueing a request nothing will take."""
    from dsv3.core.errors import DsvError

    s = Scheduler(engine, max_batch=1)
    s.error = RuntimeError("out of memory")
    with pytest.raises(DsvError, match="model loop failed .*out of memory"):
        s.submit(Request("x", [1, 2], Sampling(4), lambda *a: None, TextStream(engine.tokenizer.decode)))


PROMPTS = [[5, 9, 2], [(3 * i) % 400 + 1 for i in range(37)], [7] * 12, [1, 2, 3, 4, 5, 6, 7, 8, 9], [44, 45]]
MAX_TOKENS = [9, 14, 5, 11, 7]


def serve_all(s, engine, staggered: bool) -> dict[str, list[int]]:
    """Run PROMPTS through scheduler s (3 slots: the fourth and fifth take freed slots, so batches are any set of
    slots, and 3 rows pad to bucket 4); each request's tokens by id."""
    done = threading.Semaphore(0)
    reqs = [make(engine, p, m, done) for p, m in zip(PROMPTS, MAX_TOKENS)]
    if not staggered:  # all queued before the loop starts: the same batches every run
        for r in reqs:
            s.submit(r)
    s.start()
    try:
        for r in reqs if staggered else ():
            s.submit(r)
            time.sleep(0.01)
        for _ in reqs:
            assert done.acquire(timeout=120), f"a request never finished (the model loop: {s.error!r})"
        assert s.error is None, s.error
    finally:
        s.shutdown()
    return {r.id: r.tokens for r in reqs}


@pytest.mark.parametrize("k", [0, 1, 2], ids=["plain", "mtp-k1", "mtp-k2"])
def test_static_decode_steps_give_each_prompt_its_own_tokens(engine, demo_ckpt, monkeypatch, k):
    """fp32 with a capture hook that behaves like a graph: the server decodes through its static steps (slots staged
    in place, the whole cache as span, padding rows in the scratch slot; with --speculative mtp, drafting held on,
    the greedy round (verify, acceptance, MTP catch-up) and the MTP module's chained drafts too) and each prompt
    gets what it gets alone."""
    import dsv3
    from dsv3.serve.drafting import DraftPolicy

    monkeypatch.setattr(DraftPolicy, "record", lambda self, *a: None)  # the random MTP layer would turn drafting off
    served = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32")

    def capture(fn):
        out = tuple(t.clone() for t in fn())

        def replay():
            for o, t in zip(out, fn()):
                o.copy_(t)
        return replay, out

    monkeypatch.setattr(served.kernels, "capture_unavailable", lambda: None)
    monkeypatch.setattr(served.kernels, "capture", capture)
    s = Scheduler(served, max_batch=3, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids),
                  speculative="mtp" if k else None, draft_tokens=max(k, 1))
    got = serve_all(s, engine, staggered=True)
    for p, m in zip(PROMPTS, MAX_TOKENS):
        assert got[str(len(p))] == engine.generate([p], max_new_tokens=m)[0], f"prompt of {len(p)} tokens"
    kinds = {kind for kind, _, _ in s.runner.static}
    assert kinds == ({"round", "mtp"} if k == 2 else {"round"} if k else {"decode"}), kinds  # k = 2 chains the MTP
    assert all(st.replay is not None for st in s.runner.static.values())


@pytest.mark.parametrize("k", [0, 2], ids=["plain", "mtp-k2"])
def test_recorded_server_steps_equal_eager_ones(demo_ckpt, k):
    """bf16 on the cpu's C kernels, where the server's steps are recorded and replayed: the same tokens as a server
    whose steps run eagerly (--no-cuda-graphs: the same static steps, not recorded), over the same batches."""
    import dsv3

    results = []
    for graphs in (False, True):
        e = dsv3.load(demo_ckpt, backend="cpu", dtype="bf16", cuda_graphs=graphs)
        s = Scheduler(e, max_batch=3, prefill_chunk=16, eos_ids=tuple(e.cfg.eos_token_ids),
                      speculative="mtp" if k else None, draft_tokens=max(k, 1))
        results.append(serve_all(s, e, staggered=False))
        # the same static steps (a bucket's rows) either way, recorded or run as they are
        assert s.runner.static and all(st.captured == graphs for st in s.runner.static.values())
    assert results[0] == results[1]


def test_a_first_token_leaves_before_the_next_step(engine):
    """The token a prompt's last prefill chunk samples is handed to the HTTP side before the decode step that
    follows runs (that step would add its whole time to the time to first token)."""
    s = Scheduler(engine, max_batch=2, eos_ids=())
    order = []
    deliver, forward = s.deliver, s.runner.forward
    s.deliver = lambda batch: order.extend(("out", kind) for _, kind, _ in batch) or deliver(batch)
    s.runner.forward = lambda kind, *a, **k: order.append(("step", kind)) or forward(kind, *a, **k)
    done = threading.Semaphore(0)
    s.submit(make(engine, [3, 1, 4, 1, 5], 3, done))
    s.start()
    try:
        assert done.acquire(timeout=60)
    finally:
        s.shutdown()
    steps = [kind for what, kind in order if what == "step"]
    first_out, first_decode = order.index(("out", "text")), order.index(("step", steps[1]))
    assert first_out < first_decode, order


def test_a_scored_prompt_runs_the_output_head_on_its_own_rows_only(engine):
    """Two prompts prefilled in one forward, one scored for its logprobs (echo): the output head runs at every
    position of that row only (not B x q x V), the scored row gets one entry per prompt token, equal to a float64
    log-softmax of the model's own logits over the whole prompt, and the other row's tokens are its own."""
    s = Scheduler(engine, max_batch=2, prefill_chunk=8, eos_ids=())
    heads, logits = [], s.model.logits
    s.model.logits = lambda h: heads.append(tuple(h.shape)) or logits(h)
    done = threading.Semaphore(0)
    scored_prompt, plain_prompt = [5, 80, 81, 82, 300, 17, 44, 45, 46, 47, 9], [3, 1, 4, 1, 5, 9, 2]
    entries = []
    a = make(engine, scored_prompt, 2, done)
    a.params = Sampling(2, logprobs=0, prompt_logprobs=True)
    emit = a.emit
    a.emit = lambda kind, data: entries.extend(data) if kind == "prompt" else emit(kind, data)
    b = make(engine, plain_prompt, 4, done)
    s.submit(a, b)
    s.start()
    try:
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        s.shutdown()
    every = [shape for shape in heads if len(shape) == 3]
    assert every and all(shape[0] == 1 for shape in every), heads  # [1, q, D]: the scored row alone
    assert [t for t, _, _ in entries] == scored_prompt and entries[0][1] is None
    with torch.inference_mode():
        full = engine.model(torch.tensor([scored_prompt]))[0].double().log_softmax(-1)  # [S, V]
    want = [float(full[j - 1, t]) for j, t in enumerate(scored_prompt) if j > 0]
    got = [lp for _, lp, _ in entries[1:]]
    err = max(abs(g - w) for g, w in zip(got, want))
    assert err < 1e-4, f"prompt logprobs differ from the model's own by up to {err:.2e}"
    assert b.tokens == engine.generate([plain_prompt], max_new_tokens=4)[0]


def _prefill_rows(s):
    """Record each forward the runner runs as (kind, rows, q), and each cache copy as ("copy", src, dsts)."""
    seen, forward, copy = [], s.runner.forward, s.runner.copy
    s.runner.forward = lambda kind, slots, tokens, *a, **k: (seen.append((kind, len(slots), len(tokens[0])))
                                                             or forward(kind, slots, tokens, *a, **k))
    s.runner.copy = lambda src, dsts, n: seen.append(("copy", src, tuple(dsts))) or copy(src, dsts, n)
    return seen


@pytest.mark.parametrize("case", ["together", "leader ends at its first token", "a fork admitted later",
                                  "leader cancelled mid-prompt"])
def test_answers_of_one_prompt_read_it_once(engine, case):
    """OpenAI's n: the prompt's first request (the leader) reads it; the others (forks) take a copy of its cache
    entries and sample from its logits there. Every answer's greedy tokens equal the prompt run alone, whether the
    forks are admitted with the leader or after it has read the prompt (a slot freed), whether the leader ends at
    its first token, or leaves before the prompt is read (the forks then read it themselves)."""
    prompt = [(5 * i) % 300 + 2 for i in range(40)]  # 5 chunks of 8
    news = {"together": [6, 6, 6], "leader ends at its first token": [1, 6, 6],
            "a fork admitted later": [20, 1, 6], "leader cancelled mid-prompt": [6, 6, 6]}[case]
    s = Scheduler(engine, max_batch=2 if case == "a fork admitted later" else 4, prefill_chunk=8, eos_ids=())
    seen = _prefill_rows(s)
    done = threading.Semaphore(0)
    reqs = [make(engine, prompt, n, done) for n in news]
    for r in reqs[1:]:
        r.leader = reqs[0]
    if case == "leader cancelled mid-prompt":
        forward = s.runner.forward
        s.runner.forward = lambda *a, **k: (s.cancel(reqs[0]) if reqs[0].length >= 16 else None) or forward(*a, **k)
    s.submit(*reqs)
    s.start()
    try:
        for _ in reqs[1:] if case == "leader cancelled mid-prompt" else reqs:  # a cancelled request sends nothing
            assert done.acquire(timeout=60)
    finally:
        s.shutdown()
    want = engine.generate([prompt], max_new_tokens=max(news))[0]
    for r, n in zip(reqs, news):
        if r is reqs[0] and case == "leader cancelled mid-prompt":
            continue
        assert r.tokens == want[:n], (case, r.id, r.tokens, want[:n])
    prompt_rows = sum(rows * q for kind, rows, q in seen if kind != "copy" and q > 1)
    copies = [e for e in seen if e[0] == "copy"]
    if case == "leader cancelled mid-prompt":
        assert not copies and prompt_rows >= 16 + 2 * len(prompt), seen  # the forks read it themselves
    else:
        assert prompt_rows == len(prompt), f"the prompt was read {prompt_rows / len(prompt):.1f} times: {seen}"
        assert sum(len(c[2]) for c in copies) == 2, seen
    assert s.stats() == {"running": 0, "waiting": 0, "slots_used": 0}


def test_a_prompt_starting_with_what_a_free_slot_holds_reads_only_the_rest(engine):
    """The prefix cache: a finished request's slot keeps its cache entries (prompt + the answer's tokens fed); a
    later prompt that starts with them takes that slot and reads only the rest, and its greedy tokens are what the
    whole prompt gives alone. A prompt that diverges reuses up to there; an equal one all but its last token; a
    scored prompt (echo logprobs) and a scheduler without the cache read everything."""
    def run(s, *reqs):
        done = threading.Semaphore(0)
        for r in reqs:
            r.emit = (lambda emit: lambda kind, data: emit(kind, data) or (kind == "done" and done.release()))(r.emit)
        s.submit(*reqs)
        for _ in reqs:
            assert done.acquire(timeout=60)

    base = [(3 * i) % 200 + 7 for i in range(30)]
    s = Scheduler(engine, max_batch=3, prefill_chunk=8, eos_ids=())
    seen = _prefill_rows(s)
    s.start()
    try:
        first = make(engine, base, 6, threading.Semaphore(0))
        other = make(engine, [9, 8, 7, 6, 5], 4, threading.Semaphore(0))
        run(s, first, other)
        unrelated = make(engine, [400, 401, 402], 2, threading.Semaphore(0))
        run(s, unrelated)  # takes the empty slot, not the slot holding `first`'s history
        follow_up = base + first.tokens + [11, 12]  # the next turn: the whole answer (its last token never fed), more
        diverging = base[:10] + [250, 251, 252]
        cases = [(follow_up, len(base) + 5), (diverging, 10), (base, len(base) - 1)]
        for prompt, reused in cases:
            seen.clear()
            r = make(engine, prompt, 5, threading.Semaphore(0))
            run(s, r)
            read = sum(rows * q for kind, rows, q in seen if kind in (PREFILL, PREFILL_SCORED))
            assert (r.reused, read) == (reused, len(prompt) - reused), (prompt, r.reused, seen)
            want = engine.generate([prompt], max_new_tokens=5)[0]  # which stops at EOS; this scheduler does not
            assert r.tokens[:len(want)] == want, prompt
        scored = make(engine, base, 2, threading.Semaphore(0))
        scored.params = Sampling(2, logprobs=0, prompt_logprobs=True)
        run(s, scored)
        assert scored.reused == 0
    finally:
        s.shutdown()
    s = Scheduler(engine, max_batch=2, prefill_chunk=8, eos_ids=(), prefix_cache=False)
    s.start()
    try:
        a, b = make(engine, base, 3, threading.Semaphore(0)), make(engine, base, 3, threading.Semaphore(0))
        run(s, a)
        run(s, b)
        assert b.reused == 0 and b.tokens == a.tokens
    finally:
        s.shutdown()
