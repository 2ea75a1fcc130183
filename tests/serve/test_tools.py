"""tools (function calling) in DeepSeek-V3's format: the call grammar against calls written out by hand, its masks
against a token-by-token check, and calls from the real scheduler and over HTTP (tools.py, masks.py)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from dataclasses import replace

import pytest
from conftest import check_mask, client

jsonschema = pytest.importorskip("jsonschema")

from dsv3.serve import protocol, tools
from dsv3.serve.masks import Vocab
from dsv3.serve.scheduler import Request, Scheduler
from dsv3.serve.schema import compile_schema
from dsv3.serve.text import TextStream
from dsv3.serve.tools import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolGrammar

MARK = {CALLS_BEGIN: 2, CALLS_END: 3, CALL_BEGIN: 4, CALL_END: 5, SEP: 6}
EOS, OTHER_SPECIAL = 1, 7
NAMES = ("get_weather", "get", "sum_2")


def vocab_of(rng: random.Random) -> tuple[list[bytes | None], dict[bytes, int]]:
    """Specials 0-7 (EOS 1, the markers 2-6), every single byte, and multi-byte pieces of calls and prose."""
    pieces = [None] * 8 + [bytes((b,)) for b in range(256)]
    words = [b"function", b"func", b"tion", b"get", b"_weather", b"get_weather\n", b"\n```json\n", b"\n```", b"```",
             b'{"', b'":', b'"}', b"}\n```", b"{}", b" {", b"\n{", b"sum_2", b"the", b" call"]
    pieces += words + [bytes(rng.choices(b'{}[]":,0123456789abc_ \n`', k=rng.randint(2, 5))) for _ in range(300)]
    index = {}
    for t, b in enumerate(pieces):
        if b is not None:
            index.setdefault(b, t)
    return pieces, index


def tokens(data: bytes, index: dict[bytes, int], rng: random.Random) -> list[int]:
    """data as tokens of the vocabulary, cut at random where a longer piece exists."""
    out, i = [], 0
    while i < len(data):
        fits = [n for n in range(1, 8) if data[i:i + n] in index]
        n = rng.choice(fits)
        out.append(index[data[i:i + n]])
        i += n
    return out


def answer(calls: list[tuple[str, dict]], index, rng, prose: bytes = b"") -> list[int]:
    """An answer that calls these functions, spelled as DeepSeek-V3 does."""
    out = tokens(prose, index, rng) + [MARK[CALLS_BEGIN]]
    for j, (name, args) in enumerate(calls):
        if j:
            out += tokens(b"\n", index, rng)
        out += [MARK[CALL_BEGIN]] + tokens(b"function", index, rng) + [MARK[SEP]]
        out += tokens(name.encode() + b"\n```json\n" + json.dumps(args).encode() + b"\n```", index, rng)
        out += [MARK[CALL_END]]
    return out + [MARK[CALLS_END]]


#: get_weather declared strict: its arguments meet this schema (the other functions take any object)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]},
                                           "zip": {"type": "string", "pattern": "^[0-9]+$", "maxLength": 5}},
           "required": ["city"], "additionalProperties": False}


def grammar(choice: str = "auto", parallel: bool = True, strict: bool = False) -> ToolGrammar:
    schemas = (compile_schema(WEATHER), None, None) if strict else ()
    return ToolGrammar(NAMES, choice, parallel, tuple(sorted(MARK.items())), schemas)


def walk(v: Vocab, g: ToolGrammar, toks: list[int]):
    st = g.start
    for t in toks:
        st = v.advance(g, st, t)
        if st is None:
            return None
    return st


def test_calls_are_accepted_and_read_back():
    rng = random.Random(0)
    pieces, index = vocab_of(rng)
    v = Vocab(pieces, [EOS])
    for _ in range(200):
        calls = [(rng.choice(NAMES), {"city": "".join(rng.choices("ab \"\\\u00e9", k=rng.randint(0, 5))),
                                      "n": rng.randint(-5, 5), "more": [1, {"x": None}]})
                 for _ in range(rng.randint(1, 3))]
        toks = answer(calls, index, rng, prose=rng.choice([b"", b"the call"]))
        st = walk(v, grammar(), toks)
        assert st == ("end",), (calls, st)
        assert v.advance(grammar(), st, EOS) is not None
        got = tools.calls(toks, v.bytes, MARK)
        assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls
        whole = [(c["name"], c["arguments"].encode()) for c in got]
        for i in range(len(toks) + 1):  # what a stream sends: names in order, each argument text a prefix
            seen = tools.progress(toks[:i], v.bytes, MARK)
            assert all(n == whole[j][0] and whole[j][1].startswith(a) for j, (n, a) in enumerate(seen)), (i, seen)
        assert tools.progress(toks, v.bytes, MARK) == whole
    one = answer([("get", {})], index, rng)
    assert tools.calls(one[:-3], v.bytes, MARK) == []  # a call cut before its end is left out


@pytest.mark.parametrize("what,choice,parallel,toks", [
    ("an undeclared function", "auto", True, lambda ix, r: answer([("get_time", {})], ix, r)),
    ("a name's prefix", "auto", True, lambda ix, r: answer([("get_w", {})], ix, r)),
    ("arguments not an object", "auto", True, lambda ix, r: answer([("get", [1])], ix, r)),
    ("whitespace before the object", "auto", True,
     lambda ix, r: [2, 4] + tokens(b"function", ix, r) + [6] + tokens(b"get\n```json\n {}\n```", ix, r) + [5, 3]),
    ("a second call where parallel calls are off", "auto", False, lambda ix, r: answer([("get", {})] * 2, ix, r)),
    ("a function other than the one named", "sum_2", True, lambda ix, r: answer([("get", {})], ix, r)),
    ("calls where tool_choice is none", "none", True, lambda ix, r: answer([("get", {})], ix, r)),
    ("prose where a call is required", "required", True, lambda ix, r: answer([("get", {})], ix, r, b"the")),
    ("the calls closed before any call", "auto", True, lambda ix, r: [2, 3]),
    ("EOS inside a call", "auto", True, lambda ix, r: answer([("get", {})], ix, r)[:5] + [EOS]),
    ("a marker in prose", "auto", True, lambda ix, r: [ix[b"t"], 5]),
])
def test_what_is_not_a_call_is_refused(what, choice, parallel, toks):
    rng = random.Random(1)
    pieces, index = vocab_of(rng)
    v = Vocab(pieces, [EOS])
    assert walk(v, grammar(choice, parallel), toks(index, rng)) is None, what


@pytest.mark.parametrize("args,ok", [
    ({"city": "Paris"}, True), ({"city": "a \\\"b\u00e9", "unit": "F"}, True), ({}, False), ({"city": 3}, False),
    ({"city": "Paris", "unit": "K"}, False), ({"unit": "C", "city": "Paris"}, False), ({"city": "x", "n": 1}, False),
    ({"city": "Paris", "zip": "75001"}, True), ({"city": "Paris", "zip": "750011"}, False),
    ({"city": "Paris", "zip": "7a"}, False), ({"city": "x" * 13}, False),
])
def test_a_strict_functions_arguments_meet_its_schema(args, ok):
    """get_weather is strict; get is not, so the same arguments always pass there."""
    rng = random.Random(5)
    pieces, index = vocab_of(rng)
    v = Vocab(pieces, [EOS])
    st = walk(v, grammar(strict=True), answer([("get_weather", args)], index, rng))
    assert (st == ("end",)) == ok, (args, st)
    assert walk(v, grammar(strict=True), answer([("get", args)], index, rng)) == ("end",)


def test_prose_and_other_special_tokens_go_free():
    rng = random.Random(2)
    pieces, index = vocab_of(rng)
    v = Vocab(pieces, [EOS])
    assert walk(v, grammar(), tokens(b'any "text" {[', index, rng) + [OTHER_SPECIAL, EOS]) == ("text",)
    assert walk(v, grammar("required"), [OTHER_SPECIAL]) is None


@pytest.mark.parametrize("choice,parallel,strict", [("auto", True, False), ("required", False, False),
                                                    ("get", True, False), ("none", True, False),
                                                    ("auto", True, True)])
def test_masks_are_the_tokens_that_continue_the_call(choice, parallel, strict):
    rng = random.Random(3)
    pieces, index = vocab_of(rng)
    v = Vocab(pieces, [EOS])
    g = grammar(choice, parallel, strict)
    states = {g.start}
    for _ in range(10):
        calls = [("get", {"a": [1, "x"]}), ("sum_2", {})][:1 + parallel]
        toks = answer(calls + [("get_weather", {"city": "Nice", "unit": "C", "zip": "06000"})] * strict, index, rng)
        st = g.start
        for t in toks:
            st = v.advance(g, st, t)
            if st is None:
                break
            states.add(st)
    assert len(states) > (0 if choice == "none" else 20)
    for st in states:
        check_mask(v, g, st)


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time"}}]


def run(engine, body: dict, bias: dict[str, float]) -> tuple[list[tuple[str, object]], list[int]]:
    """One chat request through protocol.parse and a scheduler, with logit biases by token text: (the events
    other than text, the answer's tokens)."""
    tok = engine.tokenizer
    parsed = protocol.parse({"model": "m", "max_tokens": 80, "temperature": 0, **body}, True, tok, "m", 2048,
                            engine.cfg.vocab_size)
    params = replace(parsed.choices[0].params, logit_bias={tok.token_id(k): b for k, b in bias.items()})
    s = Scheduler(engine, max_batch=2, eos_ids=tuple(engine.cfg.eos_token_ids))
    done, events = threading.Semaphore(0), []

    def emit(kind, data):
        events.append((kind, data))
        if kind in ("done", "error"):
            done.release()
    r = Request("r", parsed.choices[0].prompt, params, emit, TextStream(tok.decode))
    s.submit(r)
    s.start()
    try:
        assert done.acquire(timeout=120), s.error
    finally:
        s.shutdown()
    streamed: dict[int, list] = {}  # the deltas a stream sends, which add up to each call whole
    for kind, data in events:
        for j, name, text in data if kind == "tool_delta" else ():
            assert (name is None) == (j in streamed), events
            streamed.setdefault(j, [name, ""])[1] += text
    whole = [[c["name"], c["arguments"]] for kind, data in events if kind == "tools" for c in data]
    assert [streamed[j] for j in range(len(whole))] == whole, (streamed, whole)
    return [e for e in events if e[0] not in ("text", "tool_delta")], r.out


def test_the_scheduler_returns_calls_of_declared_functions(engine):
    """Random weights: the grammar alone makes the calls well formed; a bias on '}' closes the arguments soon."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    events, out = run(engine, {"messages": messages, "tools": TOOLS, "tool_choice": "required"}, {"}": 8.0})
    (kind, found), done = events
    assert kind == "tools" and done == ("done", "tool_calls"), events
    assert found and all(c["name"] in ("get_weather", "get_time") and isinstance(json.loads(c["arguments"]), dict)
                         for c in found), found
    named = {"type": "function", "function": {"name": "get_time"}}
    events, _ = run(engine, {"messages": messages, "tools": TOOLS, "tool_choice": named}, {"}": 8.0})
    assert [c["name"] for c in events[0][1]] == ["get_time"] and events[1] == ("done", "tool_calls")
    # "none": the opening token is masked, however much the model wants it
    events, out = run(engine, {"messages": messages, "tools": TOOLS, "tool_choice": "none"},
                      {tools.CALLS_BEGIN: 100.0})
    assert events[-1] in (("done", "stop"), ("done", "length"))
    assert engine.tokenizer.token_id(tools.CALLS_BEGIN) not in out
    events, _ = run(engine, {"messages": messages, "tools": TOOLS}, {tools.CALLS_BEGIN: 100.0, "}": 8.0})
    assert events[-1] == ("done", "tool_calls"), events  # auto: the model chose to call
    strict = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": WEATHER}}]
    events, out = run(engine, {"messages": messages, "tools": strict, "tool_choice": "required"},
                      {'"': 10.0, "}": 8.0})  # '"' above '}': a string ends rather than filling with braces
    assert events[-1] == ("done", "tool_calls") and events[0][1], (events, engine.tokenizer.decode(out))
    for call in events[0][1]:  # the arguments the schema demands, whatever the random weights prefer
        assert jsonschema.Draft202012Validator(WEATHER).is_valid(json.loads(call["arguments"])), call


def test_a_conversation_with_earlier_calls_renders(engine):
    """The demo template writes earlier calls and tool results as DeepSeek-V3's does."""
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "Thanks"}]
    parsed = protocol.parse({"model": "m", "messages": messages, "tools": TOOLS}, True, engine.tokenizer, "m", 2048,
                            engine.cfg.vocab_size)
    text = engine.tokenizer.decode(parsed.choices[0].prompt, skip_special_tokens=False)
    assert (f"{tools.CALLS_BEGIN}{tools.CALL_BEGIN}function{tools.SEP}get_weather\n```json\n"
            f'{{"city": "Paris"}}\n```{tools.CALL_END}{tools.CALLS_END}') in text, text
    assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>" in text
    assert "### get_weather\nThe weather in a city" in text  # the tools described in the system prompt


def test_the_server_answers_tool_calls_to_the_openai_client(server, engine):
    close = str(engine.tokenizer.token_id("}"))
    kw = dict(model="demo", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80, temperature=0,
              logit_bias={close: 8})

    async def both():
        c = client(server)
        whole = await c.chat.completions.create(**kw)
        calls, finish = {}, None
        async for ch in await c.chat.completions.create(**kw, stream=True):
            for d in ch.choices[0].delta.tool_calls or []:
                calls.setdefault(d.index, []).append(d)
            finish = ch.choices[0].finish_reason or finish
        return whole, calls, finish

    whole, streamed, finish = asyncio.run(both())
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and msg.tool_calls, whole
    assert msg.tool_calls[0].function.name == "get_weather" and msg.tool_calls[0].id.startswith("call_")
    assert isinstance(json.loads(msg.tool_calls[0].function.arguments), dict)
    # streamed as OpenAI does: a call's first delta its id, type and name, then pieces of its arguments
    assert finish == "tool_calls" and [d[0].function.name for d in streamed.values()] == \
        [c.function.name for c in msg.tool_calls]
    for deltas in streamed.values():
        assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
        assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert ["".join(d.function.arguments for d in deltas) for deltas in streamed.values()] == \
        [c.function.arguments for c in msg.tool_calls]
    assert len(streamed[0]) > 2, streamed  # the arguments came as they were written, not whole at the end


BAD = [
    ("tools on completions", False, {"tools": TOOLS}, "tools"),
    ("a tool without a name", True, {"tools": [{"type": "function", "function": {}}]}, "tools[0]"),
    ("a name with a space", True, {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0]"),
    ("a function declared twice", True, {"tools": TOOLS + TOOLS[:1]}, "tools[2]"),
    ("tool_choice naming no tool", True, {"tools": TOOLS, "tool_choice": {"type": "function",
                                                                          "function": {"name": "x"}}}, "tool_choice"),
    ("tool_choice without tools", True, {"tool_choice": "required"}, "tool_choice"),
    ("tools with json_object", True, {"tools": TOOLS, "response_format": {"type": "json_object"}},
     "response_format"),
    ("tools with min_tokens", True, {"tools": TOOLS, "min_tokens": 2}, "min_tokens"),
    ("functions (the old form)", True, {"functions": [{"name": "f"}]}, "functions"),
    ("strict parameters with a lookahead", True, {"tools": [{"type": "function", "function": {
        "name": "f", "strict": True, "parameters": {"type": "object", "properties": {"s": {"pattern": "(?=a)"}}}}}]},
     "tools[0]"),
    ("strict parameters not an object", True, {"tools": [{"type": "function", "function": {
        "name": "f", "strict": True, "parameters": {"type": "array"}}}]}, "tools[0]"),
    ("strict not a boolean", True, {"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "tools[0]"),
]


@pytest.mark.parametrize("what,chat,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests(server, what, chat, extra, param):
    body = {"model": "demo", **({"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}), **extra}
    got, answer = server.request("POST", "/v1/chat/completions" if chat else "/v1/completions", body)
    assert got == 400 and answer["error"]["param"] == param, answer
