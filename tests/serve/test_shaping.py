"""What changes the logits before sampling, or when an answer may end, over the real server (fp32, cpu):
logit_bias, presence_penalty, frequency_penalty (OpenAI's), min_tokens (over EOS, stop ids and stop strings) and
ignore_eos (vLLM's).

The reference applies OpenAI's formula to transformers' logits on the same weights, recomputed over the whole
sequence at every step (no cache): logit[t] + bias[t] - count[t] * frequency - (count[t] > 0) * presence."""

from __future__ import annotations

import pytest
import torch
from conftest import reference


def _post(server, **body) -> dict:
    got, answer = server.request("POST", "/v1/completions", {"model": "demo", "temperature": 0,
                                                              "return_token_ids": True, **body})
    assert got == 200, answer
    return answer["choices"][0] | {"usage": answer["usage"]}


def _shaped_greedy(hf, prompt: list[int], new: int, bias=None, presence=0.0, frequency=0.0) -> list[int]:
    out = []
    for _ in range(new):
        logits = reference(hf, prompt + out)[-1].clone()  # [V] float64 log-softmax: a constant shift per step
        for t, b in (bias or {}).items():
            logits[t] += b
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        logits -= frequency * counts + presence * (counts > 0).double()
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("presence,frequency", [(0.0, 1.5), (1.5, 0.0), (-2.0, 0.5), (0.5, -2.0), (-2.0, -1.0)])
def test_penalties_follow_openais_formula(server, hf, presence, frequency):
    """Greedy tokens under penalties equal the formula's; (-2, 0.5) and (0.5, -2) tell presence from frequency
    (a token seen twice: +1 vs -3.5)."""
    prompt = [5, 80, 81, 82, 300, 17, 9, 9]
    got = _post(server, prompt=prompt, max_tokens=24, presence_penalty=presence, frequency_penalty=frequency)
    want = _shaped_greedy(hf, prompt, 24, presence=presence, frequency=frequency)
    assert got["token_ids"] == want, (presence, frequency)
    assert want != _shaped_greedy(hf, prompt, 24), "the penalties change nothing here: the test cannot fail"


def test_logit_bias(server, hf, engine):
    prompt = [3, 14, 15, 92, 65]
    ref = reference(hf, prompt)[-1]
    first, second = ref.topk(2).indices.tolist()
    forced = next(t for t in (77, 78, 79) if t not in engine.cfg.eos_token_ids)
    assert _post(server, prompt=prompt, max_tokens=6, logit_bias={str(forced): 100})["token_ids"] == [forced] * 6
    banned = _post(server, prompt=prompt, max_tokens=6, logit_bias={str(first): -100})["token_ids"]
    assert banned[0] == second and first not in banned
    mixed = {5: 3.0, 80: -2.5, 300: 4.0}
    got = _post(server, prompt=prompt, max_tokens=12, logit_bias={str(k): v for k, v in mixed.items()})["token_ids"]
    assert got == _shaped_greedy(hf, prompt, 12, bias=mixed)


def test_ignore_eos_and_min_tokens(server, engine):
    """EOS made certain by a bias: the answer ends at once, runs to max_tokens with ignore_eos, and ends right
    after min_tokens with min_tokens (EOS masked until then)."""
    eos = engine.cfg.eos_token_ids[0]
    body = dict(prompt=[3, 14, 15], max_tokens=6, logit_bias={str(eos): 100})
    at_once = _post(server, **body)
    assert (at_once["finish_reason"], at_once["usage"]["completion_tokens"]) == ("stop", 0)
    ignored = _post(server, **body, ignore_eos=True)
    assert (ignored["finish_reason"], ignored["token_ids"]) == ("length", [eos] * 6)
    floor = _post(server, **body, min_tokens=4)
    assert floor["finish_reason"] == "stop" and len(floor["token_ids"]) == 4 and eos not in floor["token_ids"]
    stop_id = floor["token_ids"][0]
    floor = _post(server, prompt=[3, 14, 15], max_tokens=6, min_tokens=3, stop_token_ids=[stop_id],
                  logit_bias={str(stop_id): 100})
    assert floor["finish_reason"] == "stop" and floor["token_ids"] == [t for t in floor["token_ids"] if t != stop_id]
    assert len(floor["token_ids"]) == 3  # the stop id masked for 3 tokens, then certain



def test_min_tokens_holds_stop_strings_too(server, engine):
    """A stop string in the answer's first min_tokens - 1 tokens does not end it (vLLM's rule); the first one
    after does. The bias makes every token the same, so the stop text comes at every token."""
    tok = next(t for t in range(60, 200) if t not in engine.cfg.eos_token_ids
               and engine.tokenizer.decode([t]).isalpha())
    piece = engine.tokenizer.decode([tok])
    body = dict(prompt=[3, 14, 15], max_tokens=8, logit_bias={str(tok): 100}, stop=[piece])
    at_once = _post(server, **body)
    assert (at_once["text"], at_once["finish_reason"]) == ("", "stop")
    floor = _post(server, **body, min_tokens=3)
    assert (floor["text"], floor["finish_reason"]) == (piece * 2, "stop"), floor


BAD = [
    ("presence_penalty 3", {"presence_penalty": 3}, "invalid_value"),
    ("frequency_penalty a string", {"frequency_penalty": "1"}, "invalid_type"),
    ("logit_bias a list", {"logit_bias": [1, 2]}, "invalid_type"),
    ("logit_bias key not a token", {"logit_bias": {"abc": 1}}, "invalid_value"),
    ("logit_bias key outside the vocabulary", {"logit_bias": {"100000000": 1}}, "invalid_value"),
    ("logit_bias value 101", {"logit_bias": {"5": 101}}, "invalid_value"),
    ("min_tokens beyond max_tokens", {"min_tokens": 9, "max_tokens": 4}, "invalid_value"),
    ("ignore_eos a string", {"ignore_eos": "yes"}, "invalid_type"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported_value"),
    ("response_format json_schema without a schema", {"response_format": {"type": "json_schema", "json_schema": {}}},
     "invalid_value"),
    ("response_format json_schema with a lookahead", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(?!a)"}}}}, "unsupported_value"),
    ("response_format yaml", {"response_format": {"type": "yaml"}}, "invalid_value"),
    ("json_object with min_tokens", {"response_format": {"type": "json_object"}, "min_tokens": 2}, "invalid_value"),
    ("json_object with ignore_eos", {"response_format": {"type": "json_object"}, "ignore_eos": True}, "invalid_value"),
    ("best_of 3", {"best_of": 3}, "unsupported_value"),
    ("suffix", {"suffix": "end"}, "unsupported_value"),
]


@pytest.mark.parametrize("what,extra,code", BAD, ids=[b[0] for b in BAD])
def test_bad_shaping_requests(server, what, extra, code):
    got, answer = server.request("POST", "/v1/completions", {"model": "demo", "prompt": "x", **extra})
    assert got == 400 and answer["error"]["code"] == code, answer
    for ok in ({"response_format": {"type": "text"}}, {"response_format": {"type": "json_object"}}, {"best_of": 1},
               {"tools": []}, {"presence_penalty": 0}):
        got, answer = server.request("POST", "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 1,
                                                                  **ok})
        assert got == 200, (ok, answer)
