"""logprobs and echo over the real server (fp32, cpu), against transformers' log-softmax on the same weights.

What evaluation harnesses send: lm-evaluation-harness scores a continuation with a completions request of the
prompt's token ids, `echo: true`, `logprobs: 1`, and reads token_logprobs / top_logprobs of the prompt."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import TOL, client, reference


def check_completion_logprobs(lp, prompt: list[int], new: list[int], top: int, ref: torch.Tensor, echo: bool) -> None:
    ids = (prompt if echo else []) + new
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"]) == len(ids), lp
    first = len(prompt) if not echo else 0
    for j, (tok, got, alts) in enumerate(zip(ids, lp["token_logprobs"], lp["top_logprobs"])):
        at = first + j  # position in prompt + new
        if at == 0:
            assert got is None and alts is None  # the first token has nothing before it
            continue
        want = float(ref[at - 1, tok])
        assert abs(got - want) < TOL, f"token {at}: logprob {got} vs transformers' {want}"
        assert len(alts) == top
        if top == 0:
            continue
        best = ref[at - 1].topk(top)
        gap = float(best.values[-1] - ref[at - 1].topk(top + 1).values[-1])
        if gap > 10 * TOL:  # the top list is unambiguous here: its values are the reference's top values
            assert sorted(alts.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=TOL)


def test_echo_logprobs_score_a_prompt_as_lm_eval_does(server, hf, engine):
    """Prompt token ids, echo, logprobs 3, greedy tokens (lm-eval's request, plus alternatives): every prompt token's
    log-probability (the prompt read in chunks of 64) and the new tokens', streamed and not, equal transformers'
    on the same weights."""
    prompt = [engine.tokenizer.bos_id] + [7, 300, 41, 41, 9, 250, 3, 77, 128, 5, 19, 400] * 25  # 301: 5 chunks

    async def main():
        c = client(server)
        whole = await c.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                           logprobs=3, extra_body={"return_token_ids": True})
        stream = await c.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            logprobs=3, stream=True)
        parts = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        text = []
        async for ch in stream:
            for choice in ch.choices:
                text.append(choice.text)
                if choice.logprobs is not None:
                    for k in parts:
                        parts[k] += getattr(choice.logprobs, k)
        return whole, parts, "".join(text)

    whole, streamed, streamed_text = asyncio.run(main())
    choice = whole.choices[0]
    new = choice.model_extra["token_ids"]
    assert len(new) == 3
    ref = reference(hf, prompt + new)
    lp = choice.logprobs.model_dump()
    check_completion_logprobs(lp, prompt, new, 3, ref, echo=True)
    assert new == [int(ref[len(prompt) - 1 + j].argmax()) for j in range(3)]  # greedy, as the reference ranks them
    # the second request may start from the first's cache entries (the prefix cache): other chunks, fp32 rounding
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    assert streamed["tokens"] == lp["tokens"] and streamed_text == choice.text
    assert choice.text.startswith(engine.tokenizer.decode(prompt)) and lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_logprobs_of_new_tokens_without_echo(server, hf):
    """logprobs 0 (only the chosen token's) on a sampled answer: every token's log-probability is the model's (the
    distribution before temperature and top_p), and the text does not start with the prompt."""
    prompt = [11, 12, 13, 200, 201]

    async def main():
        return await client(server).completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0.8,
                                                       seed=3, logprobs=0, extra_body={"return_token_ids": True})

    choice = asyncio.run(main()).choices[0]
    new = choice.model_extra["token_ids"]
    check_completion_logprobs(choice.logprobs.model_dump(), prompt, new, 0, reference(hf, prompt + new), echo=False)


def test_chat_logprobs(server, hf, engine):
    """Chat's form: content entries of token, logprob, bytes and top_logprobs, streamed and not."""
    messages = [{"role": "user", "content": "Hello there"}]
    prompt = engine.tokenizer.encode_chat(messages)

    async def main():
        c = client(server)
        whole = await c.chat.completions.create(model="demo", messages=messages, max_tokens=4, temperature=0,
                                                logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
        stream = await c.chat.completions.create(model="demo", messages=messages, max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True)
        content = []
        async for ch in stream:
            for choice in ch.choices:
                if choice.logprobs is not None and choice.logprobs.content:
                    content += choice.logprobs.content
        return whole, content

    whole, streamed = asyncio.run(main())
    choice = whole.choices[0]
    new = choice.model_extra["token_ids"]
    entries = choice.logprobs.content
    assert len(entries) == len(new) >= 1
    ref = reference(hf, prompt + new)
    for j, (tok, e) in enumerate(zip(new, entries)):
        want = float(ref[len(prompt) - 1 + j, tok])
        assert abs(e.logprob - want) < TOL, f"token {j}: {e.logprob} vs transformers' {want}"
        raw = engine.tokenizer.token_bytes(tok)
        assert bytes(e.bytes) == raw and len(e.top_logprobs) == 2
        try:
            assert e.token == raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: named by its bytes
            assert e.token == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)  # greedy: the chosen is the best
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)  # (prefix cache)


@pytest.mark.parametrize("path,body,code", [
    ("/v1/completions", {"logprobs": 21}, "invalid_value"),
    ("/v1/completions", {"logprobs": True}, "invalid_type"),
    ("/v1/completions", {"echo": "yes"}, "invalid_type"),
    ("/v1/chat/completions", {"logprobs": 3}, "invalid_type"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "invalid_value"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "invalid_value"),
], ids=["completions 21", "completions true", "echo a string", "chat 3", "top without logprobs", "top -1"])
def test_bad_logprobs_requests(server, path, body, code):
    base = {"model": "demo", "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})
    got, answer = server.request("POST", path, {**base, **body})
    assert got == 400 and answer["error"]["code"] == code, answer


def test_scoring_only_the_prompt(server, hf):
    """max_tokens 0 with echo (the older harnesses' request): the prompt back, scored, nothing generated."""
    prompt = [3, 30, 300, 31, 301, 32]
    got, answer = server.request("POST", "/v1/completions", {"model": "demo", "prompt": prompt, "max_tokens": 0,
                                                              "echo": True, "logprobs": 1})
    assert got == 200, answer
    choice, ref = answer["choices"][0], reference(hf, prompt)
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 0
    check_completion_logprobs(choice["logprobs"], prompt, [], 1, ref, echo=True)
    got, answer = server.request("POST", "/v1/completions", {"model": "demo", "prompt": prompt, "max_tokens": 0})
    assert got == 400 and "echo" in answer["error"]["message"], answer  # without echo there is nothing to return


def test_echo_without_logprobs(server):
    got, answer = server.request("POST", "/v1/completions", {"model": "demo", "prompt": "say it", "max_tokens": 2,
                                                              "echo": True, "temperature": 0})
    assert got == 200 and answer["choices"][0]["text"].startswith("say it"), answer
    assert answer["choices"][0]["logprobs"] is None


def test_lm_eval_loglikelihood_request(server, hf):
    """lm-evaluation-harness's loglikelihood request as it sends it (a batch of one token list, temperature 0,
    max_tokens 1, logprobs 1, echo) and its reading of the answer (the continuation's entries are
    token_logprobs[ctxlen:-1]; greedy when each equals its top entry), also when the one new token ends the
    request (EOS or a stop id: its entry is still there, or [ctxlen:-1] would drop a continuation token)."""
    context, continuation = [5, 80, 81, 82, 300, 17], [44, 45, 46, 47]
    ids = context + continuation
    ref = reference(hf, ids)
    want = sum(float(ref[len(context) - 1 + j, t]) for j, t in enumerate(continuation))
    greedy = all(int(ref[len(context) - 1 + j].argmax()) == t for j, t in enumerate(continuation))
    after = int(ref[-1].argmax())  # the token the request will generate
    for extra in ({}, {"stop_token_ids": [after]}):
        got, answer = server.request("POST", "/v1/completions", {
            "model": "demo", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True, **extra})
        assert got == 200, answer
        choice = answer["choices"][0]
        assert choice["finish_reason"] == ("stop" if extra else "length")
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1, lp
        scored = lp["token_logprobs"][len(context):-1]
        assert sum(scored) == pytest.approx(want, abs=len(continuation) * TOL)
        assert all(t == max(top.values()) for t, top in zip(scored, lp["top_logprobs"][len(context):-1])) == greedy


def test_rows_of_one_step_ask_different_logprobs(server, hf):
    """Concurrent requests share decode steps, whose log-softmax runs once for the rows that ask: each still gets
    its own count of alternatives and its own tokens' values (and one that asks none gets none)."""
    prompts = {0: [21, 22, 23], 2: [40, 41, 42, 43, 44], 5: [60, 61], None: [70, 71, 72, 73]}

    async def one(c, top, prompt):
        extra = {} if top is None else {"logprobs": top}
        return await c.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"return_token_ids": True, **extra})

    async def main():
        c = client(server)
        return await asyncio.gather(*(one(c, top, p) for top, p in prompts.items()))

    for (top, prompt), answer in zip(prompts.items(), asyncio.run(main())):
        choice = answer.choices[0]
        if top is None:
            assert choice.logprobs is None
            continue
        new = choice.model_extra["token_ids"]
        check_completion_logprobs(choice.logprobs.model_dump(), prompt, new, top, reference(hf, prompt + new),
                                  echo=False)
