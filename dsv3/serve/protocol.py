"""The OpenAI wire format: request validation and response bodies, without any HTTP.

Every problem with a request is an `ApiError` carrying the status and OpenAI's error object
({"error": {"message", "type", "param", "code"}}), so the HTTP layer answers it and goes on.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from . import json_mode, schema, tools
from .scheduler import Sampling

#: at most this many stop sequences (OpenAI allows 4; a few more cost nothing here)
MAX_STOPS = 16
#: at most this many alternatives per token in logprobs (OpenAI: 20 for chat, 5 for completions)
MAX_TOP_LOGPROBS = 20
#: at most this many answers per request (prompts x n; OpenAI's bound on n)
MAX_CHOICES = 128
#: at most this many entries in logit_bias (OpenAI allows 300 or more; each costs a scatter per step)
MAX_LOGIT_BIAS = 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Choice:
    """One answer a request asks for: its prompt's token ids and its sampling. A request with several prompts
    (completions) or `n` > 1 has several, in OpenAI's index order: prompt by prompt, n answers each."""

    prompt: list[int]
    params: Sampling
    prompt_index: int  # which of the request's prompts (usage counts each prompt once, whatever n)
    prompt_text: str | None = None  # the prompt as given, where it was a string


@dataclass
class Parsed:
    """A validated request: its choices, and how to answer."""

    choices: list[Choice]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    chat: bool
    echo: bool = False  # completions: the answer's text starts with the prompt's (and its logprobs, where asked)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"{name} must be a finite number, got {v!r}", name, "invalid_type")
    if v < lo or (lo_open and v == lo) or v > hi:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(400, f"{name}={v!r} is outside {rng}", name, "invalid_value")
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} must be an integer, got {v!r}", name, "invalid_type")
    return v


def _stops(body: dict) -> tuple[tuple[str, ...], frozenset[int]]:
    """`stop`: a string or a list of strings (token ids allowed in the list too); `stop_token_ids`: ids."""
    raw = body.get("stop")
    items = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or len(items) > MAX_STOPS:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop", "invalid_value")
    extra = body.get("stop_token_ids") or []
    if not isinstance(extra, list):
        raise ApiError(400, "stop_token_ids must be a list of token ids", "stop_token_ids", "invalid_type")
    strings, ids = [], []
    for where, entries in (("stop", items), ("stop_token_ids", extra)):
        for s in entries:
            if isinstance(s, str) and s and where == "stop":
                strings.append(s)
            elif isinstance(s, int) and not isinstance(s, bool) and s >= 0:
                ids.append(s)
            else:
                raise ApiError(400, f"{where} entries must be non-empty strings or token ids, got {s!r}", where,
                               "invalid_value")
    return tuple(strings), frozenset(ids)


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, got {v!r}", name, "invalid_type")
    return v


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives each token's logprobs list, or None for no logprobs. Chat: `logprobs` true/false and
    `top_logprobs`; completions: `logprobs` is the count itself."""
    name = "top_logprobs" if chat else "logprobs"
    top = _integer(body, name)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{name}={top} is outside [0, {MAX_TOP_LOGPROBS}]", name, "invalid_value")
    if not chat:
        return top
    if not _flag(body, "logprobs"):
        if top is not None:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        return None
    return top or 0


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                               "invalid_content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_type")


def parse(body, chat: bool, tokenizer, model_name: str, context: int, vocab: int) -> Parsed:
    """Validate a /v1/completions (chat=False) or /v1/chat/completions body against this model."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (GET /v1/models lists it)", "model", "missing_model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")
    n = _integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n={n} is outside [1, {MAX_CHOICES}]", "n", "invalid_value")
    declared, grammar = _tools(body, chat, tokenizer)
    if chat:
        prompts = [(_chat_prompt(body, tokenizer, declared), None)]
    else:
        prompts = _completion_prompts(body.get("prompt"), tokenizer, vocab)
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} answers; at most "
                       f"{MAX_CHOICES} per request", "n", "invalid_value")
    where = "messages" if chat else "prompt"
    for i, (prompt, _) in enumerate(prompts):
        at = f"{where}[{i}]" if len(prompts) > 1 else where
        if not prompt:
            raise ApiError(400, f"{'the prompt' if len(prompts) == 1 else at} is empty after tokenization", where,
                           "empty_prompt")
        if len(prompt) >= context:
            raise ApiError(400, f"{'the prompt' if len(prompts) == 1 else at} has {len(prompt)} tokens; this model's "
                           f"context is {context} tokens (prompt + at least 1 new token)", where,
                           "context_length_exceeded")
    echo = not chat and _flag(body, "echo")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name)
    longest = max(len(p) for p, _ in prompts)
    room = context - longest
    if max_tokens is None:
        pass  # each prompt up to the context
    elif max_tokens == 0 and echo:
        pass  # only the prompt back (scored, with logprobs): nothing is generated
    elif max_tokens < 1:
        raise ApiError(400, f"{name}={max_tokens} must be at least 1 (0 only with echo: the prompt scored)", name,
                       "invalid_value")
    elif max_tokens > room:
        raise ApiError(400, f"{name}={max_tokens} + the {'longest ' if len(prompts) > 1 else ''}prompt's {longest} tokens exceeds the context of {context} "
                       f"tokens; ask for at most {room}", name, "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default: sampling
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _integer(body, "seed")
    stop, stop_ids = _stops(body)
    stream = _flag(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_type")
    logprobs = _logprobs(body, chat)
    _unsupported(body, chat, n)
    shaping = _shaping(body, vocab, max_tokens)
    answer_format = _response_format(body, tokenizer)
    if answer_format is not None and grammar is not None:
        raise ApiError(400, "a JSON response_format and tools cannot be combined: a tool call's arguments are JSON "
                       "already", "response_format", "invalid_value")
    grammar = answer_format or grammar
    for name in ("ignore_eos", "min_tokens"):
        if grammar is not None and shaping.get(name):
            what = "tools" if answer_format is None else "a JSON response_format"
            raise ApiError(400, f"{name} cannot be combined with {what}: the answer ends where its grammar does", name,
                           "invalid_value")
    shaping["grammar"] = grammar
    choices = []
    for i, (prompt, text) in enumerate(prompts):
        for j in range(n):
            # answer j of a seeded request draws from seed + j: n different answers, and answer 0 is the n=1 one
            params = Sampling(context - len(prompt) if max_tokens is None else max_tokens, temperature, top_p,
                              None if seed is None else seed + j, stop, stop_ids, logprobs,
                              prompt_logprobs=echo and logprobs is not None, **shaping)
            choices.append(Choice(prompt, params, i, text))
    return Parsed(choices, stream, bool(opts.get("include_usage")), bool(body.get("return_token_ids")), chat, echo)


def _unsupported(body: dict, chat: bool, n: int) -> None:
    """Fields that would change the answer and that this server does not do: refused, never silently ignored."""
    if body.get("functions") or body.get("function_call"):
        name = "functions" if body.get("functions") else "function_call"
        raise ApiError(400, f"{name}: the deprecated form; send tools: [{{\"type\": \"function\", \"function\": "
                       "{...}}] (and tool_choice)", name, "unsupported_value")
    best_of = _integer(body, "best_of")
    if not chat and best_of is not None and best_of != n:
        raise ApiError(400, f"best_of={best_of}: this server returns every answer it generates (best_of = n)",
                       "best_of", "unsupported_value")
    if not chat and body.get("suffix"):
        raise ApiError(400, "suffix: this server does not fill in the middle", "suffix", "unsupported_value")


def _shaping(body: dict, vocab: int, max_tokens: int | None) -> dict:
    """What changes the logits before sampling, or when an answer may end: logit_bias, presence_penalty,
    frequency_penalty (OpenAI's), min_tokens and ignore_eos (vLLM's, which load testers send)."""
    out = {"presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
           "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
           "ignore_eos": _flag(body, "ignore_eos")}
    bias = body.get("logit_bias")
    if bias:
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ApiError(400, f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids -> bias",
                           "logit_bias", "invalid_type")
        clean = {}
        for k, v in bias.items():
            try:
                t = int(k)
            except ValueError:
                t = -1
            if not 0 <= t < vocab:
                raise ApiError(400, f"logit_bias: {k!r} is not a token id in [0, {vocab})", "logit_bias",
                               "invalid_value")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise ApiError(400, f"logit_bias[{k!r}]={v!r}: a bias is a number in [-100, 100]", "logit_bias",
                               "invalid_value")
            clean[t] = float(v)
        out["logit_bias"] = clean
    min_tokens = _integer(body, "min_tokens")
    if min_tokens is not None:
        if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
            raise ApiError(400, f"min_tokens={min_tokens} must be in [0, max_tokens]"
                           + (f" (max_tokens={max_tokens}): lower it or raise max_tokens" if min_tokens >= 0 else ""),
                           "min_tokens", "invalid_value")
        out["min_tokens"] = min_tokens
    return out


def _response_format(body: dict, tokenizer):
    """`response_format`: {"type": "text"} (the default: None), {"type": "json_object"} (one JSON object:
    json_mode.py) or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (JSON the schema
    accepts: schema.py) -> the answer's grammar. A schema the grammar cannot enforce is refused, not ignored."""
    fmt = body.get("response_format")
    kind = fmt.get("type", "text") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise ApiError(400, "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                       f"{{\"type\": \"json_schema\", \"json_schema\": {{\"schema\": ...}}}}, got {fmt!r}",
                       "response_format", "invalid_value")
    if tokenizer is None:
        raise ApiError(400, f"response_format {kind} needs the checkpoint's tokenizer.json (to know each token's "
                       "text); this server has none", "response_format", "unsupported_value")
    if kind == "json_object":
        return json_mode.JSON_OBJECT
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise ApiError(400, "response_format json_schema needs json_schema: {\"name\": ..., \"schema\": {...}}",
                       "response_format", "invalid_value")
    try:
        return schema.compile_schema(spec["schema"])
    except schema.SchemaError as e:
        raise ApiError(400, f"response_format json_schema: {e}", "response_format", "unsupported_value") from None


def _tools(body: dict, chat: bool, tokenizer) -> tuple[list[dict] | None, tools.ToolGrammar | None]:
    """`tools` (functions the model may call), `tool_choice` ("auto", "none", "required" or {"type": "function",
    "function": {"name": ...}}) and `parallel_tool_calls` -> (the tools as declared, the grammar of the answer)."""
    declared, choice = body.get("tools"), body.get("tool_choice")
    if not declared:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, f"tool_choice={choice!r} needs tools", "tool_choice", "invalid_value")
        return None, None
    if not chat:
        raise ApiError(400, "tools: only /v1/chat/completions calls tools", "tools", "unsupported_value")
    if not isinstance(declared, list):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": {name, description, "
                       "parameters}}", "tools", "invalid_type")
    names, schemas = [], []
    for i, tool in enumerate(declared):
        f = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not tools.NAME.fullmatch(f["name"]):
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} "
                           "with a name of 1-64 letters, digits, '_' or '-'", f"tools[{i}]", "invalid_value")
        if f["name"] in names:
            raise ApiError(400, f"tools[{i}]: the function {f['name']!r} is declared twice", f"tools[{i}]",
                           "invalid_value")
        if not isinstance(f.get("parameters", {}), dict) or not isinstance(f.get("description", ""), str):
            raise ApiError(400, f"tools[{i}].function: parameters must be a JSON schema object, description a string",
                           f"tools[{i}]", "invalid_type")
        names.append(f["name"])
        schemas.append(_strict_parameters(f, i))
    ids = tools.marker_ids(tokenizer) if tokenizer is not None else None
    if ids is None:
        raise ApiError(400, f"tools: this checkpoint's tokenizer has no tool-call tokens ({tools.CALLS_BEGIN} ...), so "
                       "its model cannot call tools", "tools", "unsupported_value")
    if choice is None or choice in ("auto", "none", "required"):
        choice = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and choice["function"].get("name") in names:
        choice = choice["function"]["name"]
    else:
        raise ApiError(400, f"tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                       f"\"function\": {{\"name\": one of {names}}}}}, got {choice!r}", "tool_choice", "invalid_value")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError(400, f"parallel_tool_calls must be true or false, got {parallel!r}", "parallel_tool_calls",
                       "invalid_type")
    return declared, tools.ToolGrammar(tuple(names), choice, parallel, tuple(sorted(ids.items())), tuple(schemas))


def _strict_parameters(f: dict, i: int):
    """A function declared `strict: true`: its parameters' schema, compiled (its calls' arguments meet it); else None
    (any JSON object). A strict schema the grammar cannot keep is refused, not loosened."""
    strict = f.get("strict", False)
    if not isinstance(strict, bool) and strict is not None:
        raise ApiError(400, f"tools[{i}].function.strict must be true or false, got {strict!r}", f"tools[{i}]",
                       "invalid_type")
    if not strict:
        return None
    params = f.get("parameters", {"type": "object", "properties": {}})
    try:
        compiled = schema.compile_schema(params)
    except schema.SchemaError as e:
        raise ApiError(400, f"tools[{i}].function.parameters (strict): {e}", f"tools[{i}]",
                       "unsupported_value") from None
    if compiled.nodes[0].kinds != frozenset(("object",)) or compiled.nodes[0].enum is not None:
        raise ApiError(400, f"tools[{i}].function.parameters (strict) must be {{\"type\": \"object\", ...}}: a "
                       "call's arguments are an object", f"tools[{i}]", "invalid_value")
    return compiled


def _tool_calls(m: dict, i: int) -> list[dict]:
    """An assistant message's earlier `tool_calls`, as the chat template renders them."""
    raw, out = m.get("tool_calls"), []
    if not isinstance(raw, list):
        raise ApiError(400, f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls", "invalid_type")
    for j, call in enumerate(raw):
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
            raise ApiError(400, f"messages[{i}].tool_calls[{j}] needs function: {{name, arguments (a JSON string)}}",
                           f"messages[{i}].tool_calls", "invalid_value")
        out.append({"id": call.get("id"), "type": call.get("type", "function"),
                    "function": {"name": f["name"], "arguments": f["arguments"]}})
    return out


def _chat_prompt(body: dict, tokenizer, declared: list[dict] | None = None) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages is required: a non-empty list of {role, content}", "messages",
                       "missing_messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user, assistant or tool",
                           f"messages[{i}].role", "invalid_role")
        msg = {"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)}
        if m["role"] == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m, i)
            msg["content"] = msg["content"] or None  # the template tells a message of calls alone by None
        if m["role"] == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
        clean.append(msg)
    if declared:  # the template has no place for the tools: the system prompt describes them
        if clean[0]["role"] == "system":
            clean[0] = {**clean[0], "content": clean[0]["content"] + "\n\n" + tools.describe(declared)}
        else:
            clean.insert(0, {"role": "system", "content": tools.describe(declared)})
    try:
        return tokenizer.encode_chat(clean)
    except Exception as e:  # a template that refuses this conversation
        raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages",
                       "invalid_messages") from None


def _token_ids(raw) -> bool:
    return isinstance(raw, list) and bool(raw) and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)


def _completion_prompts(raw, tokenizer, vocab: int) -> list[tuple[list[int], str | None]]:
    """`prompt`: a string, a list of token ids, or a list of either (several prompts) -> [(token ids, the text
    where given as a string)]."""
    if raw is None:
        raise ApiError(400, "prompt is required: a string or a list of token ids (or a list of those)", "prompt",
                       "missing_prompt")
    if isinstance(raw, str) or _token_ids(raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of those", "prompt",
                       "invalid_type")
    out = []
    for i, p in enumerate(raw):
        at = f"prompt[{i}]" if len(raw) > 1 else "prompt"
        if isinstance(p, str):
            out.append((tokenizer.encode(p), p))
        elif _token_ids(p):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"{at}: token {bad[0]} is outside the vocabulary [0, {vocab})", "prompt",
                               "invalid_value")
            out.append((list(p), None))
        else:
            raise ApiError(400, f"{at} must be a string or a non-empty list of token ids, got {type(p).__name__}",
                           "prompt", "invalid_type")
    return out


def logprobs_body(chat: bool, entries: list[tuple], piece, offsets: list[int] | None = None) -> dict:
    """OpenAI's logprobs object for the scheduler's entries [(token id, logprob or None, [(id, logprob)])];
    piece(id) is a token's (text, bytes). Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions:
    {tokens, token_logprobs, top_logprobs, text_offset}, `offsets` the character index where each token's text
    starts (in the prompt followed by the answer)."""
    if chat:
        def one(t, lp):
            text, raw = piece(t)
            return {"token": text, "logprob": lp, "bytes": list(raw)}

        content = [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alts]} for t, lp, alts in entries]
        return {"content": content, "refusal": None}
    return {"tokens": [piece(t)[0] for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if alts is None else {piece(a)[0]: alp for a, alp in alts} for _, _, alts in entries],
            "text_offset": list(offsets or [])}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def tool_calls(found: list[dict]) -> list[dict]:
    """The scheduler's calls ({name, arguments}) as OpenAI's tool_calls entries, each with a fresh id."""
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": dict(c)} for c in found]


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage; `cached`: prompt tokens not read again (found in the cache: prompt_tokens_details)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def join_logprobs(a: dict, b: dict) -> dict:
    """Two logprobs objects of logprobs_body's kind (the prompt's, then the answer's) as one."""
    return {k: (a[k] + b[k]) if isinstance(a[k], list) else a[k] for k in a}


def choice(index: int, chat: bool, text: str | None, finish: str | None, token_ids: list[int] | None = None,
           logprobs: dict | None = None, stream: bool = False, first: bool = False,
           tool_calls: list[dict] | None = None) -> dict:
    """One entry of `choices`: a whole answer, or (stream) one chunk's piece of it. tool_calls: OpenAI's entries
    ({id, type, function: {name, arguments}}; in a stream chunk each with its `index`)."""
    if not chat:
        out = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    elif stream:
        delta = {"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text}
        if tool_calls:
            delta["tool_calls"] = tool_calls
        out = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
        out = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out


def chunk(rid: str, model: str, created: int, chat: bool, choices: list[dict], use: dict | None = None) -> dict:
    """One server-sent event's body in OpenAI's chunk format (`choices` of `choice(..., stream=True)`; the final
    usage chunk has none)."""
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def complete(rid: str, model: str, created: int, chat: bool, choices: list[dict], use: dict) -> dict:
    """A whole (non-streamed) answer."""
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": use}


def now() -> int:
    return int(time.time())
