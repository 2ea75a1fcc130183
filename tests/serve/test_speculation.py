"""A drafting scheduler's rows that want more than greedy tokens: logprobs, logit shaping (logit_bias, penalties,
min_tokens, JSON mode), sampling. Each must get what the same request gets from a plain scheduler (whose tokens and
log-probabilities tests/serve/test_shaping.py and test_logprobs.py check against transformers), whether the drafts
all land, never land, or drafting is off (probe steps)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import make, run_all
from forced import force_drafts

from dsv3.serve import tools
from dsv3.serve.drafting import DraftPolicy
from dsv3.serve.json_mode import JSON_OBJECT
from dsv3.serve.scheduler import Request, Sampling, Scheduler
from dsv3.serve.text import TextStream
from dsv3.serve.tools import ToolGrammar, marker_ids


def requests(engine) -> list[tuple[str, list[int], Sampling]]:
    eos = engine.cfg.eos_token_ids[0]
    return [
        ("logprobs", [5, 9, 2], Sampling(10, logprobs=3)),
        ("penalties", [(3 * i) % 400 + 1 for i in range(37)],
         Sampling(12, frequency_penalty=1.5, presence_penalty=-0.5, logprobs=0)),
        ("bias", [7] * 12, Sampling(8, logit_bias={11: 4.0, 12: -3.0, 300: 2.5})),
        # EOS made certain: the answer is held to min_tokens, then ends (its EOS keeps a logprob entry)
        ("min_tokens", [1, 2, 3, 4], Sampling(9, min_tokens=6, logit_bias={eos: 100.0}, logprobs=2)),
        ("plain", [44, 45], Sampling(7)),
        # the grammar masks each position as if the drafts before it were accepted (json_mode.py)
        ("json", [5, 9, 2, 17], Sampling(14, grammar=JSON_OBJECT, logprobs=1)),
        # a call required, its arguments soon closed (the bias on '}'), then EOS: the calls read back as plain's
        ("tools", [8, 9, 10], Sampling(40, logprobs=0, logit_bias={engine.tokenizer.token_id("}"): 8.0},
                                       grammar=ToolGrammar(("get_weather", "get"), "required", True,
                                                           tuple(sorted(marker_ids(engine.tokenizer).items()))))),
    ]


def run(s: Scheduler, engine, reqs) -> dict[str, tuple[list[int], list]]:
    """(token ids, logprob entries) by request id (conftest.run_all)."""
    return {rid: (a.tokens, a.lps) for rid, a in run_all(s, engine, reqs).items()}


def same_entries(a: list, b: list, what: str) -> None:
    """Logprob entries of the same tokens: log-probabilities within fp32 noise of steps of different shapes, the
    alternatives the same where their values are not within that noise of each other."""
    assert [e[0] for e in a] == [e[0] for e in b], what
    for j, ((_, lp_a, alt_a), (_, lp_b, alt_b)) in enumerate(zip(a, b)):
        assert math.isclose(lp_a, lp_b, abs_tol=1e-4), f"{what}, token {j}: {lp_a} vs {lp_b}"
        assert len(alt_a) == len(alt_b), what
        for (ia, va), (ib, vb) in zip(alt_a, alt_b):
            assert math.isclose(va, vb, abs_tol=1e-4), f"{what}, token {j}: alternatives {alt_a} vs {alt_b}"
            tie = any(abs(va - v) < 1e-4 for i, v in alt_b if i != ib)
            assert ia == ib or tie, f"{what}, token {j}: alternatives {alt_a} vs {alt_b}"


@pytest.fixture(scope="module")
def plain(engine):
    s = Scheduler(engine, max_batch=3, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids))
    return run(s, engine, requests(engine))


@pytest.mark.parametrize("drafts", ["perfect", "always wrong", "probes"])
@pytest.mark.parametrize("k", [1, 2])
def test_logprobs_and_shaping_with_drafts_equal_plain_decoding(engine, plain, monkeypatch, drafts, k):
    # the policy held: drafting on (every round verifies k drafts) or off after the first round (probe steps)
    monkeypatch.setattr(DraftPolicy, "record", lambda self, *a: setattr(self, "drafting", drafts != "probes"))
    s = Scheduler(engine, max_batch=3, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids),
                  speculative="mtp", draft_tokens=k)
    if drafts != "probes":
        # a row that ended on EOS (its EOS keeps a logprob entry) has that last draft forced too
        want = {rid: tokens + [engine.cfg.eos_token_ids[0]] * (len(lps) > len(tokens))
                for rid, (tokens, lps) in plain.items()}
        force_drafts(s, want, drafts == "perfect")
    got = run(s, engine, requests(engine))
    for rid, (tokens, lps) in plain.items():
        assert got[rid][0] == tokens, f"{rid}: {drafts} drafts, k={k}"
        same_entries(got[rid][1], lps, f"{rid}: {drafts} drafts, k={k}")
    assert len(plain["min_tokens"][0]) == 6 and len(plain["min_tokens"][1]) == 7  # 6 tokens, then the EOS's entry
    assert marker_ids(engine.tokenizer)[tools.CALLS_END] in plain["tools"][0]  # the calls closed within max_tokens
    assert plain["bias"][0] != engine.generate([[7] * 12], max_new_tokens=8)[0], "the bias changes nothing"
    if drafts == "perfect":
        assert s.spec.accepted > 0.6 * s.spec.drafted, f"{s.spec.accepted} of {s.spec.drafted} drafts accepted"
    elif drafts == "always wrong":
        assert s.spec.accepted == 0 and s.spec.drafted > 0


@pytest.mark.parametrize("k", [1, 2])
def test_sampled_rows_shape_their_target_and_their_drafts(engine, monkeypatch, k):
    """Sampled rows verified on the host: a bias of +100 makes one token certain in the main model's distribution
    (every kept token is it) and, shaped the same way, in the drafter's (every draft lands); a bias of -100 bans
    one; each logprob entry names the emitted token."""
    monkeypatch.setattr(DraftPolicy, "record", lambda self, *a: setattr(self, "drafting", True))
    s = Scheduler(engine, max_batch=3, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids),
                  speculative="mtp", draft_tokens=k)
    forced = run(s, engine, [("forced", [5, 6, 7], Sampling(12, temperature=1.0, seed=3, logit_bias={42: 100.0}))])
    assert forced["forced"][0] == [42] * 12
    assert s.spec.accepted >= 0.9 * s.spec.drafted > 0, f"{s.spec.accepted} of {s.spec.drafted} shaped drafts landed"
    s = Scheduler(engine, max_batch=3, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids),
                  speculative="mtp", draft_tokens=k)
    banned = engine.generate([[5, 6, 7]], max_new_tokens=1)[0][0]
    got = run(s, engine, [
        ("banned", [5, 6, 7], Sampling(12, temperature=0.7, seed=4, logit_bias={banned: -100.0}, logprobs=1)),
        ("plain", [5, 6, 7], Sampling(12, temperature=0.7, seed=4)),
    ])
    tokens, lps = got["banned"]
    assert banned not in tokens and [e[0] for e in lps] == tokens
    assert all(e[1] <= 0 and len(e[2]) == 1 for e in lps)


def test_a_drafting_server_scores_a_prompt(engine):
    """echo + logprobs on a drafting scheduler: the prompt's entries from the head on the prefill's hidden states
    equal a plain scheduler's (the prompt read in chunks of 16)."""
    prompt = [(7 * i) % 300 + 2 for i in range(40)]

    def scored(spec):
        s = Scheduler(engine, max_batch=2, prefill_chunk=16, eos_ids=tuple(engine.cfg.eos_token_ids), **spec)
        done, entries = threading.Semaphore(0), []

        def emit(kind, data):
            if kind == "prompt":
                entries.extend(data)
            elif kind in ("done", "error"):
                done.release()
        s.submit(Request("p", prompt, Sampling(0, logprobs=2, prompt_logprobs=True), emit,
                         TextStream(engine.tokenizer.decode)))
        s.start()
        try:
            assert done.acquire(timeout=120), s.error
        finally:
            s.shutdown()
        return entries

    plain, drafting = scored({}), scored({"speculative": "mtp"})
    assert len(plain) == len(prompt) and plain[0] == (prompt[0], None, None) == drafting[0]
    same_entries(drafting[1:], plain[1:], "scored prompt")
    assert torch.tensor([e[1] for e in plain[1:]]).isfinite().all()


@pytest.mark.parametrize("drafts", ["as trained", "probes"])
def test_the_prefix_cache_keeps_the_mtp_cache_in_step(engine, monkeypatch, drafts):
    """With drafting, a prompt that starts with what a free slot holds reads the rest and one more position (the MTP
    cache's entry there paired it with the old next token); the slot is held only as far as the MTP cache caught up
    (probe steps leave pairs pending). Each answer is the whole prompt's alone, and at each request's end both
    caches' entries equal those of a scheduler that read every prompt whole. A request that ends at its first token
    frees its slot before the MTP module reads its last chunk: the entries must still be written there, as the slot
    is recorded as holding the whole prompt for the next request."""
    monkeypatch.setattr(DraftPolicy, "record", lambda self, *a: setattr(self, "drafting", drafts != "probes"))
    base = [(3 * i) % 200 + 7 for i in range(30)]

    def session(prefix_cache: bool):
        s = Scheduler(engine, max_batch=3, prefill_chunk=8, eos_ids=(), speculative="mtp", draft_tokens=2,
                      prefix_cache=prefix_cache)
        ends, finish = [], s._finish

        def record(r, reason):  # both caches' entries of the request's slot as it ends
            # (one that ends in its prefill: the MTP module reads its last chunk after this; the next request shows it)
            n = 0 if r.length == len(r.prompt) else r.pending_at if r.pending else r.length
            ends.append((r.tokens, r.reused, [c[:, r.slot, :r.length].clone() for c in (s.cache.kv, s.cache.pe)],
                         [c[:, r.slot, :n].clone() for c in (s.spec.cache.kv, s.spec.cache.pe)]))
            finish(r, reason)
        s._finish = record
        s.start()
        try:
            first = one(s, engine, base, 6)
            for prompt in (base + first[:5] + [11, 12],  # the answer but its last token, then other tokens
                           base + first + [13],  # the whole answer, then more
                           base[:10] + [250, 251, 252]):  # diverges early: the shared part copied to another slot
                want = engine.generate([prompt], max_new_tokens=5)[0]
                assert one(s, engine, prompt, 5)[:len(want)] == want, prompt
            short = [(5 * i) % 180 + 9 for i in range(11)]  # two chunks; ends at its first token
            one(s, engine, short, 1)
            want = engine.generate([short + [30, 31]], max_new_tokens=5)[0]
            assert one(s, engine, short + [30, 31], 5)[:len(want)] == want
        finally:
            s.shutdown()
        return ends

    cached, whole = session(True), session(False)
    assert [e[1] for e in whole] == [0] * 6
    if drafts == "as trained":  # nothing pending: the slot holds its whole history
        assert [e[1] for e in cached] == [0, 34, 34, 9, 0, 10]
    assert all(e[1] > 0 for i, e in enumerate(cached) if i not in (0, 4))
    for i, (c, w) in enumerate(zip(cached, whole)):
        for got, want in zip(c[2] + c[3], w[2] + w[3]):
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4), \
                f"request {i}: max error {(got - want).abs().max():.2e}"


def one(s: Scheduler, engine, prompt: list[int], max_tokens: int) -> list[int]:
    """A greedy request through a running scheduler, waited for: its tokens."""
    done = threading.Semaphore(0)
    r = make(engine, prompt, max_tokens, done)
    s.submit(r)
    assert done.acquire(timeout=120), f"a request never finished (the model loop: {s.error!r})"
    return r.tokens


def test_answers_of_one_prompt_read_it_once_with_drafting(engine, monkeypatch):
    """OpenAI's n with drafting: forks copy the leader's entries of both caches, and each fork's MTP entry at the
    prompt's last position pairs the leader's final hidden there with the fork's own first token (forced apart by
    a bias here). Both caches' prompt entries equal those of each request run alone, and its tokens too."""
    monkeypatch.setattr(DraftPolicy, "record", lambda self, *a: setattr(self, "drafting", True))
    prompt = [(5 * i) % 300 + 2 for i in range(40)]  # 5 chunks of 8
    params = [Sampling(4), Sampling(4, logit_bias={61: 100.0}), Sampling(4, logit_bias={62: 100.0})]

    def session(linked: bool):
        s = Scheduler(engine, max_batch=4, prefill_chunk=8, eos_ids=(), speculative="mtp", draft_tokens=2,
                      prefix_cache=False)
        ends, finish, done = {}, s._finish, threading.Semaphore(0)

        def record(r, reason):
            ends[r.id] = (r.reused, [c[:, r.slot, :len(prompt)].clone() for c in
                                     (s.cache.kv, s.cache.pe, s.spec.cache.kv, s.spec.cache.pe)])
            finish(r, reason)
        s._finish = record
        reqs, tokens = [], {}
        for i, p in enumerate(params):
            tokens[str(i)] = []
            reqs.append(Request(str(i), prompt, p, lambda kind, data, i=i: tokens[str(i)].extend(data[1])
                                if kind == "text" else kind == "done" and done.release(),
                                TextStream(engine.tokenizer.decode)))
            if linked and i:
                reqs[-1].leader = reqs[0]
        s.start()
        try:
            for r in reqs if linked else ():
                s.submit(r)
            for r in reqs if not linked else ():  # one at a time: each reads the prompt
                s.submit(r)
                assert done.acquire(timeout=120), s.error
            for _ in reqs if linked else ():
                assert done.acquire(timeout=120), s.error
        finally:
            s.shutdown()
        return ends, tokens

    (forked, got), (alone, want) = session(True), session(False)
    assert got == want and want["1"] == [61] * 4 and want["2"] == [62] * 4
    assert [forked[i][0] for i in "012"] == [0, len(prompt), len(prompt)]  # the forks read none of it
    for i in "012":
        for j, (a, b) in enumerate(zip(forked[i][1], alone[i][1])):
            assert torch.allclose(a, b, atol=1e-4), f"request {i}, cache {j}: max error {(a - b).abs().max():.2e}"


def test_drafting_under_tensor_parallel(demo_ckpt, tmp_path):
    """Two ranks (gloo), drafting held on with the greedy rows' drafts right: rank 0 schedules, drafts and accepts,
    the follower runs its plans (the MTP module's with rank 0's hidden states). Every request gets what one process
    gets, and the greedy ones plain decoding's tokens: rounds, a sampled row with a penalty, logprobs, a scored
    prompt, the next turn from the prefix cache, n answers of one prompt."""
    import subprocess
    import sys
    from pathlib import Path

    worker = str(Path(__file__).parent / "tp_spec_worker.py")
    runs = {}
    for name, launcher in (("one", []), ("tp", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])):
        out = tmp_path / f"{name}.pt"
        r = subprocess.run([sys.executable, *launcher, worker, str(demo_ckpt), str(out)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = torch.load(out)
    one, tp = runs["one"]["got"], runs["tp"]["got"]
    assert (one["world"], tp["world"]) == (1, 2)
    for rid, want in runs["one"]["want"].items():
        assert one[rid]["tokens"] == want and tp[rid]["tokens"] == want, rid
    drafted, accepted = tp["drafts"]
    assert accepted > 0.5 * drafted > 0, tp["drafts"]
    for rid in one:
        if isinstance(one[rid], dict):
            assert tp[rid]["tokens"] == one[rid]["tokens"] and tp[rid]["end"] == one[rid]["end"], rid
            assert tp[rid]["logprobs"] == pytest.approx(one[rid]["logprobs"], abs=1e-4), rid
    assert len(one["scored"]["logprobs"]) == 38 + 2 and len(one["b"]["logprobs"]) == 10  # prompt entries, new tokens


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_requests_that_end_at_their_first_token_while_drafting(demo_ckpt, dtype):
    """max_tokens 1 (two of them) beside longer requests in one prefill chunk of a drafting server: the
    short ones end when their first token is sampled, before the MTP module reads the chunk, and their slot is gone
    (-1). The MTP prefill must skip them: in bf16 the cpu backend's C kernels would write row -1, before the cache
    (heap corruption; the runner now refuses such a step). Every answer is the plain scheduler's."""
    import dsv3

    engine = dsv3.load(demo_ckpt, backend="cpu", dtype=dtype)
    eos = tuple(engine.cfg.eos_token_ids)
    reqs = [("one", [5, 9], Sampling(1)), ("long", [7] * 20, Sampling(6)), ("one-more", [3, 4, 5], Sampling(1)),
            ("two", [8], Sampling(2))]
    want = run_all(Scheduler(engine, max_batch=4, eos_ids=eos), engine, reqs)
    for k in (1, 2):
        got = run_all(Scheduler(engine, max_batch=4, eos_ids=eos, speculative="mtp", draft_tokens=k), engine, reqs)
        assert {r: (a.tokens, a.finish) for r, a in got.items()} == {r: (a.tokens, a.finish) for r, a in want.items()}
    # the API path that found it: JSON with drafts (a scheduler in the calling thread), one token per answer
    assert engine.generate([[5, 9], [1]], max_new_tokens=1, json=True, speculative="mtp") == \
        engine.generate([[5, 9], [1]], max_new_tokens=1, json=True)


@pytest.mark.parametrize("k", [1, 2])
def test_a_seeded_request_drafts_on_while_another_reaches_the_context_end(demo_ckpt, k):
    """A seeded sampled request drafts every round, so its draws repeat. A row too near the context's end for k
    drafts takes a plain step of its own then (it would alone too), not the whole batch: the seeded answer beside
    one that runs into the context's end is the one it gets alone (before, the whole batch took plain steps then, and
    the seeded answer changed with its company)."""
    import dsv3

    engine = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32", max_seq_len=64)
    seeded = ("seeded", [5, 9, 2, 7, 1], Sampling(30, temperature=1.0, seed=3, ignore_eos=True))
    long = ("long", list(range(3, 58)), Sampling(20, ignore_eos=True))  # 55 tokens: 10 more fill the context

    def answers(reqs):
        s = Scheduler(engine, max_batch=2, eos_ids=tuple(engine.cfg.eos_token_ids), speculative="mtp",
                      draft_tokens=k)
        return run_all(s, engine, reqs)
    alone, both = answers([seeded]), answers([long, seeded])
    assert both["long"].finish == "length" and len(both["long"].tokens) == 64 - 55 + 1  # the last is never fed
    assert both["seeded"].tokens == alone["seeded"].tokens
    assert both["long"].tokens[:9] == engine.generate([long[1]], max_new_tokens=9)[0]
