"""A real `dsv3 serve` in a subprocess on a free loopback port, and the in-process engine it must agree with."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from dsv3.serve.scheduler import Request, Sampling, Scheduler
from dsv3.serve.text import TextStream

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

API_KEY = "test-key"


class Server:
    def __init__(self, cmd: list[str], env=None, timeout: float = 180, sigint_ignored: bool = False):
        """sigint_ignored: start the server as a non-interactive shell starts a background job (SIGINT ignored)."""
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True, preexec_fn=(lambda: signal.signal(
                                         signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
        self.killed = False  # True when stop() had to SIGKILL it
        self.log: list[str] = []
        deadline, self.url = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"serving .* on (http://\S+) ", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log) + self.proc.stderr.read()[-3000:])
        # keep draining stderr so a chatty server never blocks on a full pipe
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def request(self, method: str, path: str, body=None, key: str | None = API_KEY, raw: bytes | None = None):
        """(status, parsed JSON or text) without any client library's own checks."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def metric(self, name: str) -> float:
        _, text = self.request("GET", "/metrics")
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.killed = True
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def serve_cmd(ckpt: Path, *extra: str, launcher: list[str] | None = None) -> list[str]:
    prefix = launcher or [sys.executable, "-m"]
    return [*prefix, "dsv3", "serve", str(ckpt), "--backend", "cpu", "--dtype", "fp32", "--port", "0",
            "--api-key", API_KEY, *extra]


@pytest.fixture(scope="module")
def server(demo_ckpt):
    s = Server(serve_cmd(demo_ckpt, "--max-batch", "8", "--max-waiting", "64", "--served-model-name", "demo"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(demo_ckpt):
    import dsv3

    return dsv3.load(demo_ckpt, backend="cpu", dtype="fp32")


#: fp32 on both sides, different kernels and summation orders: log-probabilities agree to ~1e-5
TOL = 1e-3


@pytest.fixture(scope="module")
def hf(demo_ckpt, tmp_path_factory):
    from reference import hf_model, write_hf_reference

    return hf_model(write_hf_reference(demo_ckpt, tmp_path_factory.mktemp("demo_ref")), torch.float32)


def reference(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-probabilities: row j is the distribution of token j + 1 (transformers, fp32)."""
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)


def client(server, **kw):
    """The real `openai` client on the server's /v1."""
    import openai

    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kw)


def make(engine, prompt, max_tokens, done):
    """A request whose emitted token ids collect in .tokens; done is released when it ends."""
    tokens = []

    def emit(kind, data):
        if kind == "text":
            tokens.extend(data[1])
        elif kind in ("done", "error"):
            done.release()
    r = Request(str(len(prompt)), prompt, Sampling(max_tokens), emit, TextStream(engine.tokenizer.decode))
    r.tokens = tokens
    return r


class Answer(NamedTuple):
    tokens: list[int]  # the answer's token ids
    lps: list  # its logprob entries (a request that asked)
    finish: str | None  # its finish_reason ("stop", "length", "tool_calls"), or the error's message


def run_all(s: Scheduler, engine, reqs) -> dict[str, Answer]:
    """Every (id, prompt, Sampling) submitted before the loop starts (the same batches every run), run to the end:
    each request's Answer by id."""
    done, got = threading.Semaphore(0), {}

    def make(rid, prompt, params):
        a = got[rid] = Answer([], [], [])

        def emit(kind, data):
            if kind == "text":
                a.tokens.extend(data[1])
                a.lps.extend(data[2] or [])
            elif kind in ("done", "error"):
                a.finish.append(data)
                done.release()
        return Request(rid, prompt, params, emit, TextStream(engine.tokenizer.decode))

    for rid, prompt, params in reqs:
        s.submit(make(rid, prompt, params))
    s.start()
    try:
        for _ in reqs:
            assert done.acquire(timeout=300), f"a request never finished (the model loop: {s.error!r})"
        assert s.error is None, s.error
    finally:
        s.shutdown()
    return {rid: a._replace(finish=a.finish[0]) for rid, a in got.items()}


def walk(g, text: str):
    """Grammar g's state after text's bytes (None: they break it)."""
    st = g.start
    for c in text.encode():
        st = g.step(st, c)
        if st is None:
            return None
    return st


def check_mask(v, g, st, what: str = "") -> None:
    """Vocab v's mask at state st is exactly the tokens v.advance takes from there, one by one."""
    want = {t for t in range(len(v.bytes)) if v.advance(g, st, t) is not None}
    got = set(v.allowed(g, st).nonzero().flatten().tolist())
    assert got == want, f"{what} at {st}: extra {sorted(got - want)[:5]}, missing {sorted(want - got)[:5]}"


def walk_at_random(g, rng, valid, bytes_: bytes, walks: int, steps: int, likely: bytes = b"", stay: float = 0.0) -> int:
    """Random byte walks over what grammar g allows (each step one of `bytes_` it takes, one of `likely` 80% of the
    time where any is allowed): wherever a walk stands some byte goes on or the value is whole, and each walk that
    ends (where whole: at once, or with probability 1 - stay while bytes could go on) gives text `valid` accepts.
    Returns how many ended."""
    ended = 0
    for _ in range(walks):
        st, out = g.start, bytearray()
        for _ in range(steps):
            nxt = [(c, q) for c in bytes_ if (q := g.step(st, c)) is not None]
            assert nxt or g.ends(st), f"stuck after {bytes(out)!r}"
            if g.ends(st) and (not nxt or rng.random() >= stay):
                ended += 1
                assert valid(out.decode()), bytes(out)
                break
            near = [x for x in nxt if x[0] in likely]
            c, st = rng.choice(near if near and rng.random() < 0.8 else nxt)
            out.append(c)
    return ended

