"""The static decode step (issue 12): same tokens as the eager step, no host synchronization, graph
capture through the backend hook with a checked first replay, and an eager fallback that says why."""

from __future__ import annotations

import logging

import pytest
import torch
from sync_guard import HostSync, no_host_sync
from tiny_configs import CONFIGS

import dsv3
from dsv3.core.generate import DecodeStep, all_finite, bucket
from dsv3.core.model import LatentCache

PROMPTS = [[5, 9, 200, 17, 3, 88, 41], [250, 2, 77], [12, 13]]  # different lengths: 3 rows, bucket 4


def test_all_finite_sees_one_bad_logit():
    x = torch.randn(3, 5000) * 30
    assert bool(all_finite(x)) and bool(all_finite(torch.full((4, 129280), 3e4)))  # far from fp32's range
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 4321] = bad
        assert not bool(all_finite(y)) and not bool(all_finite(y.bfloat16()))
    y = x.clone()
    y[0, 0], y[1, 1] = float("inf"), -float("inf")  # they cancel to NaN, not to a finite sum
    assert not bool(all_finite(y))


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 32]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_step_gives_the_eager_tokens(name, tiny_ckpts):
    """fp32 greedy, a batch of different lengths and a lone prompt: the fixed-span step (what a graph
    replays) and the eager step agree token for token, and a batch equals each prompt alone."""
    engine = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="fp32")
    eager = engine.generate(PROMPTS, max_new_tokens=12)
    assert engine.last_stats.extra["decode_step"] == "eager"
    static = engine.generate(PROMPTS, max_new_tokens=12, static=True)
    assert engine.last_stats.extra["decode_step"] == "static"
    assert static == eager
    assert [engine.generate([p], max_new_tokens=12)[0] for p in PROMPTS] == eager


def decode_steps(engine, prompts, span_fixed: bool, steps: int = 3):
    """Prefill outside the guard, then `steps` decode steps under it; returns the logits of each."""
    model = engine.model
    B, L = len(prompts), max(map(len, prompts))
    total = L + steps + 1
    cache = LatentCache.allocate(model.cfg, len(model.layers), bucket(B) if span_fixed else B, total, engine.dtype,
                                 model.rope_cos.device)
    tokens = torch.zeros(B, L, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    length = torch.tensor([len(p) for p in prompts])
    logits, _ = model.forward_step(tokens, torch.zeros(B, dtype=torch.long), cache, L, take=length - 1)
    step = DecodeStep(model, cache, B, total if span_fixed else None, graphs=False)
    pos, out = length.clone(), []
    with torch.inference_mode(), no_host_sync():
        for i in range(steps):
            logits, _ = step(logits.argmax(-1), pos, L + i + 1)
            out.append(logits)
            pos += 1
    return out


@pytest.mark.parametrize("mode", ["fp8", "bf16"], ids=["FP8", "BF16-sm80"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3-in-bucket4"])
def test_cuda_decode_step_makes_no_host_sync(prompts, mode, demo_ckpt, monkeypatch):
    """The cuda backend's decode step (Triton kernels under the interpreter), static span, rows at different
    positions, in the FP8 mode and in the BF16 mode of a GPU without FP8 (its bf16 experts through the fused
    MoE too): nothing in dsv3's code waits for a device value."""
    import os

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no NVIDIA GPU and TRITON_INTERPRET is not 1")
    if mode == "bf16":
        monkeypatch.setenv("DSV3_CUDA_CAPABILITY", "8.0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = dsv3.load(demo_ckpt, backend="cuda", device=device, dtype="bf16", attn_impl="absorb")
    assert (engine.kernels.fp8_dtype is not None) == (mode == "fp8")
    decode_steps(engine, prompts, span_fixed=True)


def test_every_static_step_of_the_cuda_backend_makes_no_host_sync(demo_ckpt, monkeypatch):
    """What a GPU captures besides the decode step: speculative decoding's fused greedy round, its verify and
    draft steps (sampled rows, substituted drafts), and the server's decode, round, verify and MTP steps. The
    cuda backend under the interpreter is made to take a GPU's paths (can_capture, each capture declined so the
    step runs eagerly), and each static step's body runs under the guard: a sync there would fail its graph's
    capture on a GPU, and every graph of the backend after it."""
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the cuda backend on CPU tensors: needs TRITON_INTERPRET=1")
    from dsv3.backends.cuda.backend import CudaKernels
    from dsv3.core.generate import StaticStep
    from dsv3.core.speculative import speculative_generate
    from dsv3.serve.scheduler import Request, Sampling, Scheduler
    from dsv3.serve.text import TextStream

    monkeypatch.setattr(CudaKernels, "capture_unavailable", lambda self: None)
    monkeypatch.setattr(CudaKernels, "capture", lambda self, fn: None)
    ran, run = [], StaticStep._run

    def guarded(self):
        ran.append(self.what)
        with no_host_sync():
            return run(self)
    monkeypatch.setattr(StaticStep, "_run", guarded)
    engine = dsv3.load(demo_ckpt, backend="cuda", device="cpu", dtype="bf16")
    model, prompts = engine.model, [[5, 9, 200], [12]]  # short: each launch is interpreted
    speculative_generate(model, prompts, 3, 2, adaptive=False)  # greedy: the fused round (2 drafts: chained)
    speculative_generate(model, prompts, 3, 2, adaptive=False, temperature=1.0, seed=0)  # verify, then draft
    assert {"round step", "verify step", "draft step"} <= set(ran), set(ran)
    for speculative, sampling in ((None, Sampling(2)), ("mtp", Sampling(3)), ("mtp", Sampling(3, temperature=1.0))):
        s = Scheduler(engine, max_batch=2, eos_ids=(), speculative=speculative, draft_tokens=2)
        s.complete(*(Request(str(b), p, sampling, lambda kind, data: None, TextStream(str)) for b, p in
                     enumerate(prompts)))
    assert {f"server {kind} step" for kind in ("decode", "round", "verify", "mtp")} <= set(ran), set(ran)


def test_the_guard_catches_a_sync(demo_ckpt):
    engine = dsv3.load(demo_ckpt, backend="reference", dtype="fp32")  # its MoE sizes expert runs on the host
    with pytest.raises(HostSync, match="host synchronization"):
        decode_steps(engine, PROMPTS, span_fixed=True, steps=1)


class FakeGraphs:
    """A capture hook that behaves like a graph: fn runs at capture, replay() reruns it and copies the
    result into the tensor handed out at capture (a graph's output buffer is fixed)."""

    def __init__(self, broken: bool = False):
        self.broken, self.replays = broken, 0

    def install(self, kernels, monkeypatch):
        monkeypatch.setattr(kernels, "capture_unavailable", lambda: None)
        monkeypatch.setattr(kernels, "capture", self.capture)

    def capture(self, fn):
        out = tuple(t.clone() for t in fn())  # the decode step's (logits, hidden)

        def replay():
            self.replays += 1
            for o, t in zip(out, fn()):
                o.copy_(t + (100.0 if self.broken else 0.0))
        return replay, out


def test_cuda_capture_hands_out_outputs_outside_the_graph_pool(monkeypatch):
    """CudaKernels.capture with torch.cuda's graph API played by the cpu backend's tape (it records the torch ops
    run inside `torch.cuda.graph` and replays them): the outputs it hands out are new tensors, refreshed by each
    replay (copied inside the graph, where no other graph's temporaries can be), in fn's structure (a view of a
    larger result, a scalar)."""
    import contextlib
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("builds the cuda backend on the CPU: needs TRITON_INTERPRET=1")
    from dsv3.backends.cpu import tape as tape_lib
    from dsv3.backends.cuda.backend import CudaKernels

    class Graph:
        def __init__(self):
            self.tape = tape_lib.Tape()

        def replay(self):
            self.tape.replay()

        def pool(self):
            return "pool"

    @contextlib.contextmanager
    def graph(g, pool=None):
        with torch.inference_mode(), g.tape:
            yield

    class Stream:
        def wait_stream(self, other):
            pass
    for name, value in (("Stream", lambda device: Stream()), ("current_stream", lambda device: Stream()),
                        ("stream", lambda s: contextlib.nullcontext()), ("CUDAGraph", Graph), ("graph", graph)):
        monkeypatch.setattr(torch.cuda, name, value)
    kernels = CudaKernels("cpu")
    monkeypatch.setattr(kernels, "capture_unavailable", lambda: None)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    made = []  # what each run of the step returned (the last: the captured run's, in the graph's pool)

    def step():
        y = a @ b.T + 1  # [3, 3]
        made.extend((y, y * b.sum()))
        return y[:, 0], made[-1].sum()  # a view and a scalar
    with torch.inference_mode():
        replay, out = kernels.capture(step)
        assert len(made) == 6, "two warm-ups and the captured run"
        ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
        assert not {ptr(o) for o in out} & {ptr(t) for t in made}, "an output is the step's own (pool) tensor"
        a.copy_(torch.randn(3, 4))
        b.copy_(torch.randn(3, 4))
        replay()
        want = step()
    assert isinstance(out, tuple) and [o.shape for o in out] == [torch.Size([3]), torch.Size([])]
    assert all(torch.equal(o, w) for o, w in zip(out, want))


def test_captured_step_replays_into_static_buffers(demo_ckpt, monkeypatch):
    engine = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32")
    eager = engine.generate(PROMPTS, max_new_tokens=10)
    graphs = FakeGraphs()
    graphs.install(engine.kernels, monkeypatch)
    assert engine.generate(PROMPTS, max_new_tokens=10) == eager
    assert engine.last_stats.extra["decode_step"] == "graph" and graphs.replays == 9


def test_a_wrong_replay_is_caught_and_runs_eagerly(demo_ckpt, monkeypatch, caplog):
    engine = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32")
    eager = engine.generate(PROMPTS, max_new_tokens=6)
    FakeGraphs(broken=True).install(engine.kernels, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dsv3"):
        assert engine.generate(PROMPTS, max_new_tokens=6) == eager
    assert "disagrees with the eager one" in caplog.text


def test_no_capture_is_said_once(demo_ckpt, caplog):
    engine = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32")
    with caplog.at_level(logging.INFO, logger="dsv3"):
        engine.generate(PROMPTS, max_new_tokens=2)
        engine.generate(PROMPTS, max_new_tokens=2)
    assert caplog.text.count("no graph capture") == 1
    engine.cuda_graphs = False
    engine.generate(PROMPTS, max_new_tokens=2)
    assert engine.last_stats.extra["decode_step"] == "eager"


def test_cli_graph_flag(demo_ckpt):
    from click.testing import CliRunner

    from dsv3.cli import main

    for flag in ("--cuda-graphs", "--no-cuda-graphs"):
        r = CliRunner().invoke(main, ["run", str(demo_ckpt), "--prompt", "hi", "--max-new-tokens", "2", flag])
        assert r.exit_code == 0, r.output


def test_a_kept_step_serves_the_next_call_of_its_shape(demo_ckpt, monkeypatch):
    """engine.generate keeps its captured step and cache (Engine.steps, two shapes): a later call of a kept shape
    (same bucket and span; other prompts, another batch size of the bucket) captures nothing and gives what a run
    with nothing kept gives, though the kept cache still holds the earlier call's entries (past every row's length:
    never read). A third shape drops the least recently used one; release() drops them all."""
    reference = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32")  # fp32 on the cpu: nothing captured, nothing kept
    engine = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32")
    graphs = FakeGraphs()
    graphs.install(engine.kernels, monkeypatch)
    captures = []
    capture = engine.kernels.capture
    monkeypatch.setattr(engine.kernels, "capture", lambda fn: captures.append(1) or capture(fn))
    other = [[40, 41, 42, 43, 44, 45, 46], [8, 9], [10], [11, 12, 13]]  # 4 rows, longest 7: PROMPTS' shape
    calls = [(PROMPTS, 1), (other, 1), (PROMPTS[2:], 2), (PROMPTS, 2), (PROMPTS[:2], 3), (PROMPTS[2:], 4)]
    for prompts, made in calls:
        assert engine.generate(prompts, max_new_tokens=10) == reference.generate(prompts, max_new_tokens=10)
        assert len(captures) == made, (prompts, len(captures))
    assert engine.last_stats.extra["decode_step"] == "graph"
    engine.release()
    engine.generate(PROMPTS, max_new_tokens=10)
    assert len(captures) == 5
