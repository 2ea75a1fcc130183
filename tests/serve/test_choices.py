"""Several answers per request over the real server (fp32, cpu): a list of prompts (completions) and `n`.

What clients send: lm-evaluation-harness with `batch_size` > 1 puts several token-id prompts in one completions
request and reads the answers sorted by `index`; OpenAI's `n` asks several samples of one prompt."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import TOL, client, reference


def _post(server, body: dict, path: str = "/v1/completions") -> dict:
    got, answer = server.request("POST", path, {"model": "demo", **body})
    assert got == 200, answer
    return answer


def test_several_prompts_answer_as_each_alone(server, engine):
    """A list of prompts (text and token ids, different lengths): answer i is prompt i's, as when sent alone and as
    `engine.generate` gives it; usage adds up the prompts and the answers."""
    tok = engine.tokenizer
    prompts = ["Once upon a time", [tok.bos_id, 7, 300, 41, 41, 9, 250], "A", [5] * 140]  # 140: prefilled in chunks
    body = {"max_tokens": 10, "temperature": 0, "return_token_ids": True}
    answer = _post(server, {"prompt": prompts, **body})
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]
    want = engine.generate(ids, max_new_tokens=10)
    for i, (c, p) in enumerate(zip(choices, prompts)):
        alone = _post(server, {"prompt": p, **body})["choices"][0]
        assert c["token_ids"] == want[i][:len(c["token_ids"])] and c["finish_reason"] in ("length", "stop"), (i, c)
        assert (c["text"], c["token_ids"], c["finish_reason"]) == (alone["text"], alone["token_ids"],
                                                                   alone["finish_reason"]), i
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] <= sum(map(len, ids))
    del answer["usage"]["prompt_tokens_details"]
    assert answer["usage"] == {"prompt_tokens": sum(map(len, ids)),
                               "completion_tokens": sum(len(c["token_ids"]) for c in choices),
                               "total_tokens": sum(map(len, ids)) + sum(len(c["token_ids"]) for c in choices)}


def test_lm_eval_batched_loglikelihood_request(server, hf):
    """lm-eval's loglikelihood request with batch_size 3 (three token-id prompts in one request) and its parse
    (choices sorted by index; continuation = token_logprobs[ctxlen:-1]): each sum is transformers'."""
    cases = [([5, 80, 81, 82], [300, 17]), ([9, 9, 40], [41, 42, 43]), ([1, 2, 3, 4, 5, 6, 7], [8])]
    answer = _post(server, {"prompt": [c + x for c, x in cases], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                            "echo": True, "seed": 1234})
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    assert len(choices) == len(cases)
    for (ctx, cont), c in zip(cases, choices):
        ref = reference(hf, ctx + cont)
        want = sum(float(ref[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(ctx) + len(cont) + 1, lp
        assert sum(lp["token_logprobs"][len(ctx):-1]) == pytest.approx(want, abs=len(cont) * TOL), (ctx, cont)
        assert c["text"].startswith(c["text"][:1])  # echoed prompt + one new token


def test_n_samples_are_seeded_apart(server):
    """n=3 with a seed: answer j is what n=1 with seed + j answers (so answer 0 is the n=1 answer), the three differ,
    and the request repeats exactly."""
    body = {"prompt": "Once upon", "max_tokens": 16, "temperature": 1.0, "seed": 7, "return_token_ids": True}
    answer = _post(server, {**body, "n": 3})
    got = [c["token_ids"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    alone = [_post(server, {**body, "seed": 7 + j})["choices"][0]["token_ids"] for j in range(3)]
    assert got == alone
    assert len({tuple(t) for t in got}) > 1, got
    assert [c["token_ids"] for c in _post(server, {**body, "n": 3})["choices"]] == got
    prompt_tokens = _post(server, {**body, "max_tokens": 1})["usage"]["prompt_tokens"]
    assert answer["usage"]["prompt_tokens"] == prompt_tokens  # the prompt counts once, whatever n


def _assemble(chunks, chat: bool) -> tuple[dict, dict | None]:
    """Streamed chunks -> {index: (text, token ids, finish_reason)} and the usage chunk's usage."""
    out, use = {}, None
    for ch in chunks:
        if not ch.choices:
            use = ch.usage.model_dump()
            continue
        for c in ch.choices:
            text, ids, finish = out.get(c.index, ("", [], None))
            piece = (c.delta.content or "") if chat else c.text
            assert finish is None, f"choice {c.index} got a chunk after its finish_reason"
            out[c.index] = (text + piece, ids + (c.model_extra.get("token_ids") or []), c.finish_reason)
    return out, use


def test_streamed_choices_equal_whole_ones(server):
    """Two prompts x n=2 sampled and streamed (chunks of the four answers interleaved): each index's text, token
    ids and finish equal the non-streamed answer's, each ends once, and the usage chunk adds up; chat n=2 too."""
    body = {"model": "demo", "max_tokens": 12, "temperature": 1.0, "seed": 3,
            "extra_body": {"return_token_ids": True}}

    async def main():
        c = client(server)
        whole = await c.completions.create(prompt=["Once upon", [5, 6, 7, 8]], n=2, **body)
        stream = await c.completions.create(prompt=["Once upon", [5, 6, 7, 8]], n=2, stream=True,
                                            stream_options={"include_usage": True}, **body)
        chunks = [ch async for ch in stream]
        chat = dict(messages=[{"role": "user", "content": "Hello"}], n=2, **body)
        chat_whole = await c.chat.completions.create(**chat)
        chat_chunks = [ch async for ch in await c.chat.completions.create(stream=True, **chat)]
        return whole, chunks, chat_whole, chat_chunks

    whole, chunks, chat_whole, chat_chunks = asyncio.run(main())
    got, use = _assemble(chunks, chat=False)
    assert got == {c.index: (c.text, c.model_extra["token_ids"], c.finish_reason) for c in whole.choices}
    cached = lambda u: u.pop("prompt_tokens_details")["cached_tokens"]  # noqa: E731
    assert cached(use) >= cached(whole_use := whole.usage.model_dump())  # the second request may find the first's
    assert use == whole_use
    got, _ = _assemble(chat_chunks, chat=True)
    assert got == {c.index: (c.message.content, c.model_extra["token_ids"], c.finish_reason)
                   for c in chat_whole.choices}
    assert sorted(got) == [0, 1] and got[0] != got[1]
    assert sum(1 for ch in chat_chunks for c in ch.choices if c.delta.role == "assistant") == 2  # one role each


def test_a_client_leaving_frees_every_answer(server):
    """A streamed request of n=4 answers up to the context, left after its first chunk: all four stop at once and
    free their slots (the tokens generated after leaving are a few steps' worth: < 200, not thousands)."""
    async def leave():
        stream = await client(server).completions.create(model="demo", prompt="Once", n=4, temperature=1.0,
                                                         seed=5, stream=True)
        async for _ in stream:
            break
        await stream.close()

    before = server.metric("dsv3_generation_tokens_total")
    asyncio.run(leave())
    deadline = time.monotonic() + 30
    while server.metric("dsv3_cache_slots_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("dsv3_cache_slots_used") == 0
    generated = server.metric("dsv3_generation_tokens_total") - before
    assert generated < 200, f"{generated:.0f} tokens generated for a client that left at the first"


def test_more_answers_than_the_queue_holds_is_refused(server):
    got, answer = server.request("POST", "/v1/completions", {"model": "demo", "prompt": "x", "n": 100})
    assert got == 400 and answer["error"]["param"] == "n" and "--max-waiting" in answer["error"]["message"], answer
