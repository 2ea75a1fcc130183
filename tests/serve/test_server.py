"""The real server, spoken to by the real `openai` client (fp32, cpu backend, the demo checkpoint)."""

from __future__ import annotations

import asyncio
import random
import time

import openai
import psutil
import pytest
import torch
from conftest import client


def test_models_and_health(server):
    status, body = server.request("GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "demo", body
    status, body = server.request("GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok", body


def test_http_runs_on_httptools_and_uvloop(server):
    """The serve extra's C HTTP parser and event loop (the test extra installs them too): a missing install step would
    leave every other test here passing on pure-Python h11/asyncio, slower per token."""
    started = "".join(server.log)
    assert "HTTP on httptools + uvloop" in started, started


def test_24_staggered_streams_equal_each_prompt_alone(server, engine):
    """Requests join and leave the running batch (max batch 8, so 16 also queue); each one's greedy tokens are the
    prompt's own through engine.generate, and usage counts them exactly."""
    rng = random.Random(0)
    vocab = engine.cfg.vocab_size
    jobs = [([rng.randrange(1, vocab) for _ in range(rng.randrange(1, 40))], rng.randrange(1, 24), rng.random() * 1.5)
            for _ in range(24)]

    async def one(c, prompt, max_tokens, delay):
        await asyncio.sleep(delay)
        stream = await c.completions.create(model="demo", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True})
        ids, text, finish, use = [], [], None, None
        async for ch in stream:
            if ch.usage is not None:
                use = ch.usage
            for choice in ch.choices:
                ids += (choice.model_extra or {}).get("token_ids") or []
                text.append(choice.text)
                finish = choice.finish_reason or finish
        return ids, "".join(text), finish, use

    async def main():
        c = client(server)
        return await asyncio.gather(*(one(c, *j) for j in jobs))

    results = asyncio.run(main())
    for (prompt, max_tokens, _), (ids, text, finish, use) in zip(jobs, results):
        want = engine.generate([prompt], max_new_tokens=max_tokens, temperature=0.0)[0]
        assert ids == want, f"prompt of {len(prompt)} tokens: served {ids} != alone {want}"
        assert text == engine.tokenizer.decode(want)
        assert finish == ("length" if len(want) == max_tokens else "stop")
        assert (use.prompt_tokens, use.completion_tokens, use.total_tokens) == (
            len(prompt), len(want), len(prompt) + len(want))


def test_chat_non_streaming_matches_generate(server, engine):
    async def main():
        return await client(server).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0)

    r = asyncio.run(main())
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    want = engine.generate([prompt], max_new_tokens=12)[0]
    assert r.choices[0].message.content == engine.tokenizer.decode(want)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(want)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_cancelled_streams_free_their_slots(server):
    """100 clients leave mid-stream; then the server still serves a full batch, and holds nothing for them."""
    proc = psutil.Process(server.proc.pid)

    async def leave(c):
        stream = await c.completions.create(model="demo", prompt="The", max_tokens=1500, temperature=0, stream=True)
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.close()

    async def full_batch(c):
        rs = await asyncio.gather(*(c.completions.create(model="demo", prompt=[5 + i], max_tokens=8, temperature=0)
                                    for i in range(8)))
        return [r.usage.completion_tokens for r in rs]

    async def main():
        c = client(server)
        await full_batch(c)
        before = proc.memory_info().rss
        for _ in range(10):
            await asyncio.gather(*(leave(c) for _ in range(10)))
        return before, await full_batch(c)

    before, counts = asyncio.run(main())
    deadline = time.monotonic() + 30
    while server.metric("dsv3_cache_slots_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("dsv3_cache_slots_used") == 0
    assert server.metric("dsv3_num_requests_waiting") == 0
    assert all(n >= 1 for n in counts)
    assert 'dsv3_requests_total{outcome="cancelled"}' in server.request("GET", "/metrics")[1]
    grown = proc.memory_info().rss - before
    assert grown < 64 << 20, f"the server grew by {grown / 2**20:.1f} MiB over 100 cancelled streams"


BAD = [
    ("malformed JSON", None, b"{not json", 400, "invalid_json"),
    ("unknown model", {"model": "gpt-4", "prompt": "x"}, None, 404, "model_not_found"),
    ("missing model", {"prompt": "x"}, None, 400, "missing_model"),
    ("max_tokens 0", {"model": "demo", "prompt": "x", "max_tokens": 0}, None, 400, "invalid_value"),
    ("max_tokens beyond the context", {"model": "demo", "prompt": "x", "max_tokens": 10**6}, None, 400,
     "context_length_exceeded"),
    ("prompt longer than the context", {"model": "demo", "prompt": [7] * 5000}, None, 400, "context_length_exceeded"),
    ("temperature -1", {"model": "demo", "prompt": "x", "temperature": -1}, None, 400, "invalid_value"),
    ("temperature nan", None, b'{"model": "demo", "prompt": "x", "temperature": NaN}', 400, "invalid_type"),
    ("top_p 0", {"model": "demo", "prompt": "x", "top_p": 0}, None, 400, "invalid_value"),
    ("max_tokens a string", {"model": "demo", "prompt": "x", "max_tokens": "8"}, None, 400, "invalid_type"),
    ("token outside the vocabulary", {"model": "demo", "prompt": [10**6]}, None, 400, "invalid_value"),
    ("n 0", {"model": "demo", "prompt": "x", "n": 0}, None, 400, "invalid_value"),
    ("prompts x n beyond 128", {"model": "demo", "prompt": ["x", "y"], "n": 65}, None, 400, "invalid_value"),
    ("an empty prompt list", {"model": "demo", "prompt": []}, None, 400, "invalid_type"),
    ("a bad prompt in a list", {"model": "demo", "prompt": ["x", [1, "y"]]}, None, 400, "invalid_type"),
    ("a token outside the vocabulary in a list", {"model": "demo", "prompt": [[1], [10**6]]}, None, 400,
     "invalid_value"),
    ("a JSON list", [1, 2], None, 400, "invalid_body"),
]


@pytest.mark.parametrize("what,body,raw,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests(server, what, body, raw, status, code):
    got, answer = server.request("POST", "/v1/completions", body, raw=raw)
    assert got == status and answer["error"]["code"] == code, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    got, answer = server.request("POST", "/v1/completions", {"model": "demo", "prompt": "ok", "max_tokens": 2})
    assert got == 200 and answer["usage"]["prompt_tokens"] > 0, answer  # still serving


def test_bad_chat_requests_and_auth(server):
    for body, status, code in [({"model": "demo"}, 400, "missing_messages"),
                               ({"model": "demo", "messages": []}, 400, "missing_messages"),
                               ({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_role")]:
        got, answer = server.request("POST", "/v1/chat/completions", body)
        assert got == status and answer["error"]["code"] == code, answer
    got, answer = server.request("POST", "/v1/chat/completions", {"model": "demo", "messages": []}, key="wrong")
    assert got == 401 and answer["error"]["code"] == "invalid_api_key"
    got, answer = server.request("GET", "/v1/models", key=None)
    assert got == 401
    got, answer = server.request("GET", "/v1/nothing-here")
    assert got == 404 and "error" in answer

    async def sdk():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
        with pytest.raises(openai.BadRequestError):
            await client(server).chat.completions.create(model="demo", messages=[], max_tokens=2)

    asyncio.run(sdk())


def test_stop_strings_and_seed(server):
    async def text(**kw):
        kw = {"model": "demo", "prompt": "Once upon", "max_tokens": 40, "temperature": 0, **kw}
        r = await client(server).completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason

    async def streamed(**kw):
        stream = await client(server).completions.create(model="demo", prompt="Once upon", max_tokens=40,
                                                         temperature=0, stream=True, **kw)
        parts, finish = [], None
        async for ch in stream:
            parts.append(ch.choices[0].text)
            finish = ch.choices[0].finish_reason or finish
        return "".join(parts), finish

    full, _ = asyncio.run(text())
    assert len(full) > 12, full
    stop = full[8:11]
    cut = full[:full.find(stop)]
    for fn in (text, streamed):
        got, finish = asyncio.run(fn(stop=[stop, "\x00never"]))
        assert (got, finish) == (cut, "stop"), (fn.__name__, stop, got)
    a, b = asyncio.run(text(temperature=1.0, seed=123)), asyncio.run(text(temperature=1.0, seed=123))
    assert a == b
    assert len({asyncio.run(text(temperature=1.0, seed=s))[0] for s in range(4)}) > 1  # seeds matter


def test_metrics_exposition(server):
    status, text = server.request("GET", "/metrics", key=None)
    assert status == 200
    for name in ("dsv3_requests_total", "dsv3_generation_tokens_total", "dsv3_num_requests_waiting",
                 "dsv3_time_to_first_token_seconds_bucket", "dsv3_time_per_output_token_seconds_count",
                 "dsv3_decode_batch_size_bucket"):
        assert name in text, name


def concurrent_greedy(server, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The served token ids of greedy completions of all prompts, sent at once."""
    async def main():
        c = client(server)
        return await asyncio.gather(*(c.completions.create(model="demo", prompt=p, max_tokens=max_tokens, temperature=0,
                                                           extra_body={"return_token_ids": True}) for p in prompts))
    return [r.choices[0].model_extra["token_ids"] for r in asyncio.run(main())]


def test_tensor_parallel_under_torchrun(demo_ckpt, engine, server):
    """Two ranks (gloo): rank 0 serves HTTP and schedules, both run every step; the answer is one process's, a
    prompt's logprobs too (its chunks computed on both ranks: the output head gathers), and n answers of one
    prompt (its cache entries copied on both ranks)."""
    import sys

    from conftest import Server, serve_cmd

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    s = Server(serve_cmd(demo_ckpt, "--max-batch", "4", "--served-model-name", "demo", launcher=launcher))
    try:
        prompts = [[3, 14, 15, 92, 65], [2, 71, 82], list(range(1, 30))]
        for p, ids in zip(prompts, concurrent_greedy(s, prompts, 10)):
            assert ids == engine.generate([p], max_new_tokens=10)[0]
        scored = {"model": "demo", "prompt": list(range(1, 150)), "max_tokens": 2, "temperature": 0, "echo": True,
                  "logprobs": 2}
        (got, tp), (_, one) = s.request("POST", "/v1/completions", scored), server.request("POST", "/v1/completions",
                                                                                          scored)
        assert got == 200, tp
        tp, one = tp["choices"][0]["logprobs"], one["choices"][0]["logprobs"]
        assert tp["tokens"] == one["tokens"] and len(tp["tokens"]) == 151
        assert tp["token_logprobs"][1:] == pytest.approx(one["token_logprobs"][1:], abs=1e-4)
        # n = 3: the prompt read once, its cache entries copied to the other answers' slots on both ranks
        got, answer = s.request("POST", "/v1/completions", {"model": "demo", "prompt": prompts[2], "max_tokens": 10,
                                                             "temperature": 0, "n": 3, "return_token_ids": True})
        assert got == 200, answer
        want = engine.generate([prompts[2]], max_new_tokens=10)[0]
        assert [c["token_ids"] for c in answer["choices"]] == [want] * 3
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.stop()
    assert s.proc.returncode is not None


def test_speculative_serving(demo_ckpt, engine, server):
    """`dsv3 serve --speculative mtp --draft-tokens 2`: concurrent greedy requests get each prompt's own tokens, a
    seeded sampled request repeats itself, logprobs and shaping are the plain server's, and /metrics counts the
    drafts."""
    from conftest import Server, serve_cmd

    s = Server(serve_cmd(demo_ckpt, "--max-batch", "4", "--served-model-name", "demo", "--speculative", "mtp",
                         "--draft-tokens", "2"))
    try:
        prompts = [[3, 14, 15, 92, 65], [2, 71, 82], list(range(1, 30)), [9] * 7, [4, 4, 2]]
        for p, ids in zip(prompts, concurrent_greedy(s, prompts, 12)):
            assert ids == engine.generate([p], max_new_tokens=12)[0]

        async def sampled():
            c = client(s)
            r = await c.completions.create(model="demo", prompt=[5, 6, 7], max_tokens=10, temperature=0.9, seed=7,
                                           extra_body={"return_token_ids": True})
            return r.choices[0].model_extra["token_ids"]
        assert asyncio.run(sampled()) == asyncio.run(sampled())
        # logprobs (echo included) and shaping as the plain server gives them (tests/serve/test_speculation.py
        # checks them in depth against a plain scheduler)
        body = {"model": "demo", "prompt": [5, 6, 9, 13], "max_tokens": 6, "temperature": 0, "logprobs": 2,
                "echo": True, "frequency_penalty": 1.0, "logit_bias": {"5": 3}, "return_token_ids": True}
        (got, answer), (_, want) = s.request("POST", "/v1/completions", body), server.request("POST", "/v1/completions",
                                                                                           body)
        assert got == 200, answer
        a, w = answer["choices"][0], want["choices"][0]
        assert a["token_ids"] == w["token_ids"] and a["logprobs"]["tokens"] == w["logprobs"]["tokens"]
        assert torch.allclose(torch.tensor(a["logprobs"]["token_logprobs"][1:]),
                              torch.tensor(w["logprobs"]["token_logprobs"][1:]), atol=1e-4)
        got, answer = s.request("POST", "/v1/completions", {"model": "demo", "prompt": [5, 6], "max_tokens": 5,
                                                             "ignore_eos": True, "temperature": 0})
        assert got == 200 and answer["usage"]["completion_tokens"] == 5, answer  # EOS handling works with drafts
        assert s.metric("dsv3_spec_draft_tokens_total") > 0
        assert s.metric("dsv3_spec_drafting") in (0.0, 1.0)  # the adaptive switch's state
    finally:
        s.stop()


def test_streamed_tokens_are_not_held_by_nagle():
    """The server's listening socket gives connections that asyncio sets TCP_NODELAY on: with Nagle's algorithm on,
    each small streamed write waited for the client's delayed ACK of the previous one (+20 ms to the first token)."""
    import socket

    from dsv3.cli.serve_cmd import listen_socket

    async def accepted_nodelay() -> int:
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        sock = listen_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_ctrl_c_stops_a_server_started_in_the_background(demo_ckpt):
    """A job a non-interactive shell puts in the background (a CI step, `dsv3 serve ... &` in a script) starts with
    SIGINT ignored; Ctrl-C / `kill -INT` must still stop the server at once, not leave it to a SIGKILL."""
    import time

    from conftest import Server, serve_cmd

    s = Server(serve_cmd(demo_ckpt), sigint_ignored=True)
    assert s.request("GET", "/health")[0] == 200
    t0 = time.monotonic()
    s.stop()
    assert not s.killed and time.monotonic() - t0 < 15, "".join(s.log)[-2000:]
    assert "dsv3: stopping" in "".join(s.log)


def test_the_next_turn_of_a_chat_reads_only_what_is_new(server, engine):
    """The prefix cache over HTTP: a chat's second turn (the first turn and its answer, then a new message) finds
    the first turn's cache entries: usage reports them as cached, /metrics counts them, and the answer is the whole
    conversation's greedy answer."""
    async def turn(messages):
        return await client(server).chat.completions.create(model="demo", messages=messages, max_tokens=8,
                                                             temperature=0, extra_body={"return_token_ids": True})

    messages = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm."}]
    first = asyncio.run(turn(messages))
    before = server.metric("dsv3_prefix_cache_hit_tokens_total")
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = asyncio.run(turn(messages))
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens, (first.usage, second.usage)
    assert server.metric("dsv3_prefix_cache_hit_tokens_total") - before == cached
    prompt = engine.tokenizer.encode_chat(messages)
    assert second.choices[0].model_extra["token_ids"] == engine.generate([prompt], max_new_tokens=8)[0][:8]
