"""Speculative decoding with the MTP drafter: the same greedy tokens as plain decoding, caches that hold
exactly what a plain run of the accepted tokens writes, and sampling with the main model's distribution."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_configs import CONFIGS

import dsv3
from dsv3.core.errors import DsvError
from dsv3.core.model import LatentCache
from dsv3.core.speculative import speculative_generate
from dsv3.synthetic import DEMO, write_checkpoint

PROMPTS = [[5, 9, 200, 17, 3, 88], [30, 2, 77], list(range(1, 20)), [7]]


@pytest.fixture(scope="module")
def engines(tiny_ckpts, demo_ckpt):
    return {name: dsv3.load(path, backend="cpu", dtype="fp32") for name, path in {"demo": demo_ckpt, **tiny_ckpts}.items()}


@pytest.mark.parametrize("name", ["demo", *CONFIGS])
def test_greedy_tokens_equal_plain_decoding(engines, name):
    """MTP drafts (k = 1 and 2, drafting kept on whatever the acceptance), batch 1 and a batch of 4 prompts of
    different lengths, 64 new tokens: token for token what plain greedy decoding gives."""
    e = engines[name]
    for batch in ([PROMPTS[0]], PROMPTS):
        plain = e.generate(batch, max_new_tokens=64)
        for k in (1, 2):
            spec, stats = speculative_generate(e.model, batch, 64, k, eos_ids=tuple(e.cfg.eos_token_ids),
                                               adaptive=False)
            assert spec == plain, f"{name} batch {len(batch)} k={k}: {spec} != {plain}"
            assert stats.extra["rounds"] > 0


def oracle(plain: list[list[int]], wrong: bool, vocab: int):
    """Drafts from the known answer: the next k tokens (all accepted), or each one shifted (all rejected)."""
    def drafter(k):
        def draft(rows, length, out):
            d = torch.zeros(len(out), k, dtype=torch.long)
            for b, o in enumerate(out):
                nxt = (plain[b] + [0] * (k + 1))[len(o):len(o) + k]
                d[b] = (torch.tensor(nxt) + int(wrong)) % vocab
            return d
        return draft
    return drafter


def replayed_caches(model, prompts, outs, lengths):
    """The caches a plain forward of each row's kept tokens writes: main [0, length), MTP pairs [0, length)."""
    B, T = len(prompts), max(lengths) + 1
    cache = LatentCache.allocate(model.cfg, len(model.layers), B, T, torch.float32, "cpu")
    mtp = LatentCache.allocate(model.cfg, 1, B, T, torch.float32, "cpu")
    for b in range(B):
        seq = (prompts[b] + outs[b])[:lengths[b] + 1]
        tokens = torch.tensor([seq[:lengths[b]]])
        one = LatentCache(cache.kv[:, b:b + 1], cache.pe[:, b:b + 1])
        _, h = model.forward_step(tokens, torch.zeros(1, dtype=torch.long), one, lengths[b])
        model.mtp_step(torch.tensor([seq[1:lengths[b] + 1]]), h, torch.zeros(1, dtype=torch.long),
                       LatentCache(mtp.kv[:, b:b + 1], mtp.pe[:, b:b + 1]), lengths[b],
                       take=torch.tensor([lengths[b] - 1]))
    return cache, mtp


@pytest.mark.parametrize("name", ["demo", "v3ish"])
def test_bf16_greedy_at_batch_1_equals_plain_decoding(tiny_ckpts, demo_ckpt, name):
    """bf16 on the cpu backend, batch 1: a verify step of 1 + k <= 4 rows stays on the C kernels a plain step of one
    row takes (below 17 rows, and below 5 where AMX tiles would take over), whose sums for a row do not depend on the
    rows beside it. So greedy tokens equal plain decoding bit for bit there too (README: past those row counts a
    verify step may round otherwise, as a batch does), with every draft accepted or none."""
    e = dsv3.load(demo_ckpt if name == "demo" else tiny_ckpts[name], backend="cpu", dtype="bf16")
    if getattr(e.model.kernels, "native", None) is None:
        pytest.skip("the cpu backend's C kernels are not built here (torch's GEMMs round by shape)")
    for prompt in PROMPTS[:2]:
        plain = e.generate([prompt], max_new_tokens=40)
        for k in (1, 2, 3):
            for wrong in (False, True):
                spec, stats = speculative_generate(e.model, [prompt], 40, k, eos_ids=tuple(e.cfg.eos_token_ids),
                                                   drafter=oracle(plain, wrong, e.cfg.vocab_size)(k))
                assert spec == plain, f"{name} k={k} {'all rejected' if wrong else 'all accepted'}: {spec} != {plain}"
                assert stats.extra["rounds"] > 0


@pytest.mark.parametrize("wrong", [False, True], ids=["all-accepted", "all-rejected"])
@pytest.mark.parametrize("k", [1, 2])
def test_forced_acceptance_and_rejection_leave_the_caches_of_a_plain_run(engines, wrong, k):
    e = engines["demo"]
    m = e.model
    plain = e.generate(PROMPTS, max_new_tokens=20)
    keep = {}
    with torch.inference_mode():
        spec, stats = speculative_generate(m, PROMPTS, 20, k, eos_ids=tuple(e.cfg.eos_token_ids),
                                           drafter=oracle(plain, wrong, e.cfg.vocab_size)(k), keep=keep)
        assert spec == plain
        # drafts past the known answer (the last round of a row) are guesses either way
        assert (stats.extra["acceptance"] < 0.1) if wrong else (stats.extra["acceptance"] > 0.85), stats.extra
        if not wrong:
            assert stats.extra["tokens_per_round"] > 1.5
            assert f"{stats.extra['tokens_per_round']:.2f} tokens/step" in stats.line(), stats.line()
        lengths = keep["length"]
        for b, p in enumerate(PROMPTS):  # every kept token but the last is in the cache; nothing else counts
            assert lengths[b] >= len(p) + len(spec[b]) - 1
        want = [len(p) + len(o) - 1 for p, o in zip(PROMPTS, spec)]
        cache, mtp = replayed_caches(m, PROMPTS, spec, want)
    for b, n in enumerate(want):
        for got, ref, what in ((keep["cache"].kv, cache.kv, "main kv"), (keep["cache"].pe, cache.pe, "main pe"),
                               (keep["mtp_cache"].kv, mtp.kv, "mtp kv"), (keep["mtp_cache"].pe, mtp.pe, "mtp pe")):
            err = (got[:, b, :n] - ref[:, b, :n]).abs().max().item()
            assert err < 1e-4, f"row {b}, {what}: entries 0..{n - 1} differ from a plain run by {err:.2e}"


@pytest.mark.parametrize("resume", [False, True], ids=["drafting-stops", "drafting-resumes"])
def test_adaptive_mode_switches_without_changing_tokens_or_caches(engines, monkeypatch, resume):
    """Adaptive runs time drafting rounds, then plain steps, and go on with the faster; when drafting resumes,
    the MTP cache first catches up on the plain steps (checked against a plain run's pairs)."""
    import dsv3.core.speculative as spec

    monkeypatch.setattr(spec, "JUDGE_AFTER", 3)
    monkeypatch.setattr(spec, "QUIT_AFTER", 1000)
    monkeypatch.setattr(spec, "_cannot_pay", lambda *a: False)  # the random demo drafter lands nothing: time it anyway
    monkeypatch.setattr(spec, "_start_drafting", lambda hits: True)  # one probe, then rounds
    monkeypatch.setattr(spec, "_keep_drafting", lambda rate: resume)
    e = engines["demo"]
    plain = e.generate(PROMPTS, max_new_tokens=24)
    keep = {}
    with torch.inference_mode():
        out, stats = spec.speculative_generate(e.model, PROMPTS, 24, 1, eos_ids=tuple(e.cfg.eos_token_ids),
                                               keep=keep)
        assert out == plain
        assert stats.extra["drafting_at_end"] == resume and stats.extra["rounds"] >= 3
        if resume:
            want = [len(p) + len(o) - 1 for p, o in zip(PROMPTS, out)]
            _, mtp = replayed_caches(e.model, PROMPTS, out, want)
            for b, n in enumerate(want):
                err = (keep["mtp_cache"].kv[:, b, :n] - mtp.kv[:, b, :n]).abs().max().item()
                assert err < 1e-4, f"row {b}: MTP cache differs from a plain run's pairs by {err:.2e}"


def test_eos_inside_an_accepted_run(engines):
    e = engines["demo"]
    plain = e.generate([PROMPTS[2]], max_new_tokens=30)[0]
    eos = plain[7]  # a token the run produces mid-way: the answer ends before it, even when drafted with more
    want, _ = speculative_generate(e.model, [PROMPTS[2]], 30, 1, eos_ids=(eos,), adaptive=False,
                                   drafter=lambda *a: torch.zeros(1, 1, dtype=torch.long))  # rejected: plain path
    for k in (1, 2, 3):
        got, _ = speculative_generate(e.model, [PROMPTS[2]], 30, k, eos_ids=(eos,),
                                      drafter=oracle([plain], False, e.cfg.vocab_size)(k))
        assert got == want == [plain[:plain.index(eos)]], (k, got, want)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_a_drafter_that_never_lands_is_probed_then_dropped(engines, monkeypatch, rows):
    """The demo's random MTP layer, greedy, adaptive (the default): probes (plain steps that also run the drafter)
    until QUIT_AFTER drafts, one per row a probe, none of which would have landed (3 probes at batch 1, 2 at batch
    2, 1 from batch 3: scored from the prefill's drafts, no MTP call), then no verify round at all; the plain
    tokens, and the main cache a plain run writes."""
    import dsv3.core.speculative as spec

    calls = []
    real = spec._Speculation.catch_up
    monkeypatch.setattr(spec._Speculation, "catch_up", lambda self, score: calls.append(score) or real(self, score))
    e = engines["demo"]
    prompts = PROMPTS[:rows]
    plain = e.generate(prompts, max_new_tokens=24)
    keep = {}
    probes = math.ceil(spec.QUIT_AFTER / rows)
    with torch.inference_mode():
        out, stats = spec.speculative_generate(e.model, prompts, 24, 2, eos_ids=tuple(e.cfg.eos_token_ids), keep=keep)
        assert out == plain
        assert (stats.extra["probes"], stats.extra["rounds"], stats.extra["acceptance"]) == (probes, 0, 0.0)
        assert calls == ([True] if probes > 1 else []), calls  # the later probes' drafts: one MTP call
        assert not stats.extra["drafting_at_end"] and stats.steps == 23
        assert f"drafting stopped after {probes} probe{'s' if probes > 1 else ''} (" in stats.line(), stats.line()
        want = [len(p) + len(o) - 1 for p, o in zip(prompts, out)]
        cache, _ = replayed_caches(e.model, prompts, out, want)
    for b, n in enumerate(want):
        err = (keep["cache"].kv[:, b, :n] - cache.kv[:, b, :n]).abs().max().item()
        assert err < 1e-4, f"row {b}: main cache differs from a plain run by {err:.2e}"


@pytest.mark.parametrize("k", [1, 2])
def test_rows_of_different_lengths_when_drafting_stops(engines, monkeypatch, k):
    """Rows 0 and 2 draft perfectly, 1 and 3 never, so when drafting stops they are at different lengths and need
    different numbers of tokens: generate's loop, which finishes the run, must give the plain tokens, write each
    row's cache as a plain run does, and write no row past its answer (the cache has a round's slack, not a row's)."""
    import dsv3.core.speculative as spec

    monkeypatch.setattr(spec, "JUDGE_AFTER", 3)
    monkeypatch.setattr(spec, "QUIT_AFTER", 1000)
    monkeypatch.setattr(spec, "_cannot_pay", lambda *a: False)
    monkeypatch.setattr(spec, "_keep_drafting", lambda rate: False)
    e = engines["demo"]
    new = 12
    plain = e.generate(PROMPTS, max_new_tokens=new)
    right, wrong = oracle(plain, False, e.cfg.vocab_size)(k), oracle(plain, True, e.cfg.vocab_size)(k)

    def mixed(rows, length, out):
        good, bad = right(rows, length, out), wrong(rows, length, out)
        return torch.where((torch.arange(len(out)) % 2 == 0)[:, None], good, bad)

    keep = {}
    with torch.inference_mode():
        out, stats = spec.speculative_generate(e.model, PROMPTS, new, k, eos_ids=tuple(e.cfg.eos_token_ids),
                                               drafter=mixed, adaptive=True, keep=keep)
        assert out == plain
        assert not stats.extra["drafting_at_end"]
        want = [len(p) + len(o) - 1 for p, o in zip(PROMPTS, out)]
        cache, _ = replayed_caches(e.model, PROMPTS, out, want)
    for b, p in enumerate(PROMPTS):
        assert want[b] <= keep["length"][b] <= len(p) + new + k, (b, keep["length"], want)
        err = (keep["cache"].kv[:, b, :want[b]] - cache.kv[:, b, :want[b]]).abs().max().item()
        assert err < 1e-4, f"row {b}: main cache differs from a plain run by {err:.2e}"


def test_no_mtp_layer_is_a_clear_error(demo_ckpt):
    e = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32", with_mtp=False)
    with pytest.raises(DsvError, match="no MTP layer"):
        e.generate([[1, 2, 3]], max_new_tokens=4, speculative="mtp")


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    cfg = {**DEMO, "vocab_size": 12, "num_hidden_layers": 2}
    path = write_checkpoint(tmp_path_factory.mktemp("vocab12"), cfg, seed=3, tokenizer=False)
    return dsv3.load(path, backend="cpu", dtype="fp32")


@pytest.mark.parametrize("adaptive", [False, True], ids=["drafting", "probing"])
def test_sampling_keeps_the_main_models_distribution(tiny_vocab, adaptive):
    """Vocabulary of 12, temperature 1: the second and third sampled tokens over 3000 rows with speculation
    (the MTP drafter, k = 2: both acceptance and rejection happen; adaptive: the second comes from a probe, a plain
    step that scores the drafts instead of feeding them, then the drafts land often enough for a round) against their exact distribution from the main model; a
    chi-square goodness-of-fit test per position (df = 11) must not reject at p < 1e-4."""
    m = tiny_vocab.model
    prompt, N, V = [3, 7, 1], 3000, 12
    with torch.inference_mode():
        p1 = m(torch.tensor([prompt]))[0, -1].softmax(-1).double()  # [V]
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        p2_given = m(seqs)[:, -1].softmax(-1).double()  # [V, V]
        p2 = p1 @ p2_given
        seqs3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3_given = m(seqs3)[:, -1].softmax(-1).double().view(V, V, V)
        p3 = torch.einsum("a,ab,abc->c", p1, p2_given, p3_given)
    out, stats = speculative_generate(m, [prompt] * N, 3, 2, temperature=1.0, seed=0, adaptive=adaptive)
    assert 0.0 < stats.extra["acceptance"] < 1.0, stats.extra
    assert (stats.extra["probes"], stats.extra["rounds"]) == ((1, 1) if adaptive else (0, 2)), stats.extra
    for i, exact in ((1, p2), (2, p3)):
        counts = torch.bincount(torch.tensor([o[i] for o in out]), minlength=V).double()
        expected = exact * N
        chi2 = ((counts - expected) ** 2 / expected).sum()
        p_value = torch.special.gammaincc(torch.tensor((V - 1) / 2, dtype=torch.float64), chi2 / 2).item()
        assert p_value > 1e-4, f"token {i + 1}: chi2 {chi2:.1f} (df {V - 1}), p = {p_value:.2e}"


@pytest.mark.slow
def test_greedy_tokens_equal_plain_decoding_on_the_280m_model(tmp_path_factory):
    from dsv3.synthetic import BENCH_280M

    path = write_checkpoint(tmp_path_factory.mktemp("spec280m"), BENCH_280M, seed=0, n_shards=4, tokenizer=False)
    e = dsv3.load(path, backend="cpu", dtype="fp32")
    for batch in ([PROMPTS[0]], PROMPTS):
        plain = e.generate(batch, max_new_tokens=64)
        for k in (1, 2):
            spec, _ = speculative_generate(e.model, batch, 64, k, eos_ids=tuple(e.cfg.eos_token_ids), adaptive=False)
            assert spec == plain, f"280M batch {len(batch)} k={k}"


def test_training_the_demo_mtp_layer(tmp_path):
    """dsv3 demo --train-mtp's trainer: the loss falls, every MTP tensor is rewritten (and nothing else), and the
    rewritten checkpoint loads and drafts."""
    from dsv3.core.names import expected_hf_tensors
    from dsv3.synthetic.train_mtp import train_mtp

    path = write_checkpoint(tmp_path / "demo", DEMO, seed=0)
    e = dsv3.load(path, backend="cpu", dtype="fp32")
    before = e.model.layers[0].attn.wq_a.weight.clone()
    losses = []
    trained = train_mtp(e, steps=40, n_seq=64, length=24, progress=lambda i, n, loss: losses.append(loss))
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    layer = e.cfg.num_hidden_layers
    mtp_names = {n for n, s in expected_hf_tensors(e.cfg, fp8=False).items() if n.startswith(f"model.layers.{layer}.")
                 and not n.endswith((".embed_tokens.weight", ".shared_head.head.weight"))}
    assert set(trained) == mtp_names
    write_checkpoint(path, DEMO, seed=0, overrides=trained)
    e2 = dsv3.load(path, backend="cpu", dtype="fp32")
    assert torch.equal(e2.model.layers[0].attn.wq_a.weight, before)  # the main model is untouched
    w = e2.model.mtp[0].eh_proj.weight
    assert (w - trained[f"model.layers.{layer}.eh_proj.weight"]).abs().max() < 0.1 * w.abs().max()  # FP8 rounding
    out, stats = speculative_generate(e2.model, [[1, 2, 3]], 8, 1, adaptive=False)
    assert len(out[0]) == 8 and stats.extra["rounds"] > 0


def static_steps_made(monkeypatch) -> list:
    """Every StaticStep made from now on, in order (the list fills as they are made)."""
    from dsv3.core.generate import StaticStep

    made = []
    real_init = StaticStep.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(StaticStep, "__init__", init)
    return made


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("resume", [False, True], ids=["drafting-stops", "drafting-resumes"])
def test_captured_verify_and_plain_steps_change_nothing(tiny_ckpts, monkeypatch, resume, temperature):
    """bf16 on the cpu backend, where the steps of a run are recorded and replayed: greedy, the whole round
    (verify, acceptance and the MTP catch-up, q = 1 + k: greedy_round); sampled, the verify step and the MTP
    catch-up (q = 1 + k) apart, the host drawing in between; both, the MTP catch-up after a probe (q = 1) and the
    plain decode step (the probe, the timed plain steps and every step after drafting stops). The tokens (sampled:
    the same seed) and both caches equal a run with nothing captured (the replays read back hidden states from
    one reused buffer, so a kept one must have been copied)."""
    import dsv3.core.speculative as spec

    monkeypatch.setattr(spec, "JUDGE_AFTER", 3)
    monkeypatch.setattr(spec, "QUIT_AFTER", 1000)
    monkeypatch.setattr(spec, "_cannot_pay", lambda *a: False)
    monkeypatch.setattr(spec, "_start_drafting", lambda hits: True)
    monkeypatch.setattr(spec, "CAPTURE_AFTER", 0)  # capture every step shape at once ...
    monkeypatch.setattr(spec, "_worth_capturing", lambda decided, accepted: True)  # ... even before a draft lands
    monkeypatch.setattr(spec, "_keep_drafting", lambda rate: resume)
    made = static_steps_made(monkeypatch)
    e = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="bf16")
    runs = []
    for graphs in (False, True):
        keep = {}
        out, stats = spec.speculative_generate(e.model, PROMPTS, 24, 2, eos_ids=tuple(e.cfg.eos_token_ids), keep=keep,
                                               graphs=graphs, temperature=temperature, seed=5)
        runs.append((out, keep))
    (eager, a), (captured, b) = runs
    captured_steps = sorted((v.what, v.buffers["tokens"].shape[1]) for v in made if v.replay is not None)
    rounds = [("round step", 3)] if temperature == 0 else [("draft step", 3), ("verify step", 3)]
    assert captured_steps == sorted([("decode step", 1), ("draft step", 1), *rounds]), captured_steps
    assert captured == eager
    assert a["length"] == b["length"]
    for name in ("cache", "mtp_cache"):
        for t in ("kv", "pe"):
            for row, n in enumerate(a["length"]):
                x, y = getattr(a[name], t)[:, row, :n], getattr(b[name], t)[:, row, :n]
                assert torch.equal(x, y), f"{name}.{t} row {row} differs"


def test_kept_steps_serve_the_next_call(tiny_ckpts, monkeypatch):
    """bf16 on the cpu backend with a StepPool (what engine.generate passes): a second call of the same shape, other
    prompts, records nothing new and gives the tokens of a call with nothing kept, though the kept caches still hold
    the first call's entries past each row's length."""
    import dsv3.core.speculative as spec
    from dsv3.core.generate import StepPool

    made = static_steps_made(monkeypatch)
    e = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="bf16")
    eos = tuple(e.cfg.eos_token_ids)
    pool = StepPool()
    other = [[60, 61, 62], list(range(100, 119)), [8, 9, 10, 11], [250]]  # longest 19, as PROMPTS
    for prompts in (PROMPTS, other):
        want, _ = spec.speculative_generate(e.model, prompts, 24, 1, eos_ids=eos, adaptive=False)
        before = len(made)
        got, _ = spec.speculative_generate(e.model, prompts, 24, 1, eos_ids=eos, adaptive=False, pool=pool)
        assert got == want
    assert before == len(made), "the second call recorded its steps again"
    assert [s.replay is not None for s in pool.shapes[next(iter(pool.shapes))]["static"].values()] == [True]  # round


def test_the_probes_score_step_is_captured_from_the_second_call(tiny_ckpts, monkeypatch):
    """bf16 on the cpu backend, adaptive, a StepPool: the MTP call that scores the probes runs once a call, so the
    first call runs it eagerly and the second records it (a capture costs ~2 eager runs); from then on it replays.
    Every call scores its probes against the same drafts as a call with nothing kept, and decodes the same tokens."""
    import dsv3.core.speculative as spec
    from dsv3.core.generate import StepPool

    made = static_steps_made(monkeypatch)
    scored = []  # each scoring's draft logits, as first_draft_lands sees them
    real = spec.first_draft_lands
    monkeypatch.setattr(spec, "first_draft_lands", lambda d, *a: scored.append(d.clone()) or real(d, *a))
    monkeypatch.setattr(spec, "_start_drafting", lambda hits: False)  # every call probes 3 times, then stops
    monkeypatch.setattr(spec, "QUIT_AFTER", 3 * len(PROMPTS))
    e = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="bf16")
    eos = tuple(e.cfg.eos_token_ids)
    want, _ = spec.speculative_generate(e.model, PROMPTS, 12, 1, eos_ids=eos)
    alone, scored[:] = scored[:], []
    pool, score_steps = StepPool(), []
    for call in range(3):
        got, stats = spec.speculative_generate(e.model, PROMPTS, 12, 1, eos_ids=eos, pool=pool)
        assert got == want and stats.extra["probes"] == 3, (call, stats.extra)
        assert len(scored) == len(alone), (call, len(scored))
        for i, (x, y) in enumerate(zip(scored, alone)):
            assert torch.equal(x, y), f"call {call}, scoring {i}: max error {(x - y).abs().max().item():.2e}"
        scored.clear()
        score_steps.append([s for s in made if s.what == "probe score step"])
    assert [len(s) for s in score_steps] == [0, 1, 1], score_steps
    assert score_steps[1][0].replay is not None, "the score step was not recorded"


@pytest.mark.parametrize("starts", [False, True], ids=["drafting-stops", "drafting-starts"])
def test_probes_scored_in_one_catch_up_count_the_drafts_that_would_have_landed(tiny_vocab, monkeypatch, starts):
    """Adaptive, greedy, the MTP drafter over a vocabulary of 12 (its drafts land often), QUIT_AFTER set to 3
    probes' drafts: the first probe is scored from the prefill's drafts, the next 2 after one MTP call over all of
    them. The probes' hits equal the drafts that match the plain tokens, each draft computed here by the MTP module
    over its own prefix; when the decision after that call starts drafting, the tokens and the MTP cache are a
    plain run's."""
    import dsv3.core.speculative as spec

    probes = 3
    decisions = []  # hits at each decision: one per probe, and one after the catch-up, which may start drafting
    monkeypatch.setattr(spec, "_start_drafting",
                        lambda hits: decisions.append(hits) or (starts and len(decisions) > probes))
    monkeypatch.setattr(spec, "JUDGE_AFTER", 1000)  # once started, drafting goes on: the MTP cache follows to the end
    monkeypatch.setattr(spec, "_cannot_pay", lambda *a: False)
    e, m = tiny_vocab, tiny_vocab.model
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 12, (n,), generator=g).tolist() for n in (1, 2, 3, 5, 8, 4, 6, 7) * 2]
    monkeypatch.setattr(spec, "QUIT_AFTER", probes * len(prompts))
    plain = e.generate(prompts, max_new_tokens=10, ignore_eos=True)  # every row probed 3 times
    keep = {}
    with torch.inference_mode():
        out, stats = spec.speculative_generate(m, prompts, 10, 1, keep=keep)
        assert out == plain
        matches = 0
        for p, o in zip(prompts, plain):
            seq = p + o
            _, h = m.forward_step(torch.tensor([seq]), torch.zeros(1, dtype=torch.long),
                                  LatentCache.allocate(m.cfg, len(m.layers), 1, len(seq), torch.float32, "cpu"),
                                  len(seq), all_hidden=True)  # [1, n, D]
            for i in range(probes):  # probe i chose o[1 + i]; its draft: position len(p) - 1 + i's
                at = len(p) - 1 + i
                logits, _ = m.mtp_step(torch.tensor([seq[1:at + 2]]), h[:, :at + 1], torch.zeros(1, dtype=torch.long),
                                       LatentCache.allocate(m.cfg, 1, 1, at + 1, torch.float32, "cpu"), at + 1,
                                       take=torch.tensor([at]))
                matches += int(logits[0].argmax()) == o[1 + i]
    assert 0 < matches < probes * len(prompts), matches  # neither all nor none: the count can be wrong
    assert len(decisions) == probes + 1 and decisions[-1] == matches, (decisions, matches)
    assert stats.extra["probes"] == probes and (stats.extra["rounds"] > 0) == starts, stats.extra
    if starts:
        want = [len(p) + len(o) - 1 for p, o in zip(prompts, out)]
        _, mtp = replayed_caches(m, prompts, out, want)
        for b, n in enumerate(want):
            err = (keep["mtp_cache"].kv[:, b, :n] - mtp.kv[:, b, :n]).abs().max().item()
            assert err < 1e-4, f"row {b}: MTP cache differs from a plain run's pairs by {err:.2e}"
    else:
        assert stats.extra["acceptance"] == pytest.approx(matches / (probes * len(prompts)))


def test_drafting_is_hopeless_only_when_break_even_acceptance_is_implausible():
    """_cannot_pay against closed forms: k = 1, a round of 1.75 plain steps breaks even at acceptance 0.75, where
    1 landed of 5 has chance 0.25^5 + 5 * 0.75 * 0.25^4 = 1.6% (go on) and 1 of 6 has 0.46% (stop); k = 2, a round
    of 1.5 steps needs a + a^2 = 0.5, a = (sqrt(3) - 1) / 2, where 0 of 9 has (1 - a)^9 = 1.7% and 0 of 11 0.66%."""
    from dsv3.core.speculative import STOP_P, _cannot_pay

    assert STOP_P == 0.01
    tail = lambda a, n, s: sum(math.comb(n, i) * a ** i * (1 - a) ** (n - i) for i in range(s + 1))  # noqa: E731
    assert tail(0.75, 5, 1) > STOP_P > tail(0.75, 6, 1)
    assert not _cannot_pay(1.75, 1, 1, 5) and _cannot_pay(1.75, 1, 1, 6)
    a = (3 ** 0.5 - 1) / 2
    assert tail(a, 9, 0) > STOP_P > tail(a, 11, 0)
    assert not _cannot_pay(1.5, 2, 0, 9) and _cannot_pay(1.5, 2, 0, 11)
    assert _cannot_pay(1.5, 2, 0.9, 11)  # a sampled probe's fractional hits count as the whole ones below them
    assert _cannot_pay(2.0, 1, 40, 40) and _cannot_pay(3.1, 2, 40, 40)  # no acceptance pays: even all landing
    assert not _cannot_pay(1.0, 1, 0, 100) and not _cannot_pay(0.9, 2, 0, 100)  # a round no dearer than a step
    assert not _cannot_pay(1.75, 1, 0, 0)  # nothing seen yet


def test_one_slow_step_does_not_decide_the_adaptive_trial():
    """The trial's rates: tokens over the median step time. 4 drafting rounds of 1.1 ms gaining 5 tokens lose to 4
    plain steps of 0.6 ms gaining 4, however slow one of those was (a sum of the times would have kept drafting:
    5 / 4.4 ms against 4 / 5.3 ms)."""
    from dsv3.core.speculative import _keep_drafting, _rate

    took = {True: [1.1e-3] * 4, False: [0.6e-3, 0.6e-3, 3.5e-3, 0.6e-3]}
    rate = {True: _rate(took[True], 5), False: _rate(took[False], 4)}
    assert rate[False] == pytest.approx(4 / 2.4e-3) and rate[True] == pytest.approx(5 / 4.4e-3)
    assert not _keep_drafting(rate)
    assert 5 / sum(took[True]) > 4 / sum(took[False])  # what the sums would have said


def test_a_timed_plain_step_leaves_the_loops_bookkeeping_out(engines, monkeypatch):
    """The adaptive mode weighs drafting rounds against plain steps, and once drafting stops the plain steps run in
    generate's loop, without this loop's per-step bookkeeping (~0.2 ms on a cpu, a third of the demo model's step):
    a plain step is timed from its call to the host read of its tokens, nothing after. Here the step itself is
    slowed by 30 ms and the bookkeeping after it (scoring the probe) by 300 ms: each timed plain step reads between."""
    import time

    import dsv3.core.speculative as spec

    e = engines["demo"]
    real_step, real_lands = spec._Speculation.plain_step, spec.first_draft_lands

    def slow_step(self):
        step = real_step(self)
        return lambda *a, **k: (time.sleep(0.03), step(*a, **k))[1]

    monkeypatch.setattr(spec._Speculation, "plain_step", slow_step)
    monkeypatch.setattr(spec, "first_draft_lands", lambda *a, **k: (time.sleep(0.3), real_lands(*a, **k))[1])
    run = spec._Speculation(e.model, [PROMPTS[0]], 8, 1, 0.0, 1.0, (), None, None, None, True, False, None)
    with torch.inference_mode():
        run.prefill([PROMPTS[0]])
        run.plain_step()  # made before the loop, so the first probe (scored at once, by first_draft_lands) is timed
        run.decode()
    assert run.probes >= 1 and len(run.took[False]) == run.probes, f"{run.probes} probes, timed {run.took[False]}"
    assert all(0.03 <= t < 0.3 for t in run.took[False]), f"timed plain steps {run.took[False]} s"
