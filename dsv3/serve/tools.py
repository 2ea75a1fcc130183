"""OpenAI's `tools` (function calling) in DeepSeek-V3's own format, with calls that always parse.

DeepSeek-V3 writes tool calls with special tokens, as its chat template renders them in a conversation:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜>
    (\\n<｜tool▁call▁begin｜>... for each further call)<｜tool▁calls▁end｜><｜end▁of▁sentence｜>

`ToolGrammar` is that format as a grammar of masks.py: prose first (unconstrained), then, once the model opens
the calls, only a declared function's name and a JSON object as its arguments (json_mode.py; for a function
declared `strict`, JSON its parameters' schema accepts: schema.py), so a call never names an unknown function or
carries arguments that do not parse. tool_choice "none" masks the opening token,
"required" (or one named function) makes the answer open with it. `calls` reads the calls back from the tokens,
`progress` what a stream can send of them so far.

The checkpoint's template renders the conversation's earlier calls and tool results; it does not describe the
tools themselves, so `describe` writes them into the system prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from . import json_mode
from .schema import JsonSchema

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
#: OpenAI's rule for a function's name
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_OPEN_ARGS, _CLOSE_ARGS = b"\n```json\n", b"\n```"
#: the arguments' JSON state: before the object with no whitespace left to spend (the object opens at once)
_ARGS = ("", "B", json_mode.MAX_WS)


def marker_ids(tokenizer) -> dict[str, int] | None:
    """The tool-call tokens' ids in this tokenizer, or None where it lacks one (no tool calls then)."""
    ids = {m: tokenizer.token_id(m) for m in MARKERS}
    return None if None in ids.values() else ids


@dataclass(frozen=True)
class ToolGrammar:
    """An answer that may call the functions `names`. choice: "auto", "none", "required", or a name (that one
    function, once); parallel: more than one call in the answer. ids: marker_ids. schemas: per name, the
    compiled schema its arguments meet (strict functions) or None (any JSON object); empty: all None. States:
    ("text",) prose; ("want", token, next) one marker token; ("lit", bytes, next) these bytes; ("name", (names'
    remaining bytes, index)...); ("json", json state) or ("schema", index, schema state) the arguments; ("after",)
    after a call; ("end",) EOS."""

    names: tuple[str, ...]
    choice: str
    parallel: bool
    ids: tuple[tuple[str, int], ...]
    schemas: tuple[JsonSchema | None, ...] = ()

    @property
    def start(self):
        return ("text",) if self.choice in ("auto", "none") else ("want", self._id(CALLS_BEGIN), self._opened())

    def _id(self, marker: str) -> int:
        return dict(self.ids)[marker]

    def _opened(self):
        """After the calls' opening token: a call."""
        return ("want", self._id(CALL_BEGIN), self._call())

    def _call(self):
        names = self.names if self.choice in ("auto", "required") else (self.choice,)
        spelled = tuple((n.encode() + _OPEN_ARGS, self.names.index(n)) for n in names)  # prefix-free: no newlines
        return ("lit", b"function", ("want", self._id(SEP), ("name", spelled)))

    def _args(self, i: int):
        """Function i's arguments, opening at once (no whitespace before the object)."""
        g = self.schemas[i] if self.schemas else None
        return ("json", _ARGS) if g is None else ("schema", i, g.tight_start)

    def _closed(self):
        """After the arguments' object: its fence next, no whitespace after it."""
        return ("lit", _CLOSE_ARGS, ("want", self._id(CALL_END), ("after",)))

    def step(self, st, c: int):
        kind = st[0]
        if kind == "lit":
            if c != st[1][0]:
                return None
            return ("lit", st[1][1:], st[2]) if len(st[1]) > 1 else st[2]
        if kind == "name":
            left = tuple((n[1:], i) for n, i in st[1] if n[0] == c)
            if not left:
                return None
            whole = [i for n, i in left if not n]
            return self._args(whole[0]) if whole else ("name", left)
        if kind == "json":
            nxt = json_mode.step(st[1], c)
            if nxt is None:
                return None
            return self._closed() if json_mode.complete(nxt) else ("json", nxt)
        if kind == "schema":
            g = self.schemas[st[1]]
            nxt = g.step(st[2], c)
            if nxt is None:
                return None
            return self._closed() if g.whole(nxt) else ("schema", st[1], nxt)
        if kind == "after" and self.parallel and self.choice in ("auto", "required") and c == 0x0A:
            return self._opened()
        return None

    def special(self, st, token: int):
        kind = st[0]
        if kind == "text":
            if token == self._id(CALLS_BEGIN):
                return None if self.choice == "none" else self._opened()
            return None if token in dict(self.ids).values() else st  # other special tokens: prose's business
        if kind == "want":
            return st[2] if token == st[1] else None
        if kind == "after" and token == self._id(CALLS_END):
            return ("end",)
        return None

    def ends(self, st) -> bool:
        return st[0] in ("text", "end")

    def free(self, st) -> bool:
        return st[0] == "text"

    def counted(self, st):
        if st[0] != "schema":
            return None
        split = self.schemas[st[1]].counted(st[2])
        if split is None:
            return None
        base, room, live = split
        wrap = None if live is None else lambda end, k: live(end[2], k)  # the schema's own state inside ours
        return (None if base is None else ("schema", st[1], base)), room, wrap

    def in_string(self, st) -> bool:
        if st[0] == "schema":
            return self.schemas[st[1]].in_string(st[2])
        return st[0] == "json" and json_mode.in_string(st[1])


def _bodies(tokens: list[int], token_bytes, ids: dict[str, int]) -> list[tuple[bytes, bool]]:
    """Each call begun among an answer's tokens (from the calls' opening token on): the bytes between its separator
    and its end token (NAME, the opening fence, ARGUMENTS, the closing fence) and whether it has ended."""
    out, body, inside = [], [], False
    for t in tokens:
        if t == ids[SEP]:
            inside, body = True, []
        elif t == ids[CALL_END] and inside:
            out.append((b"".join(body), True))
            inside = False
        elif inside:
            body.append(token_bytes[t])
    if inside:
        out.append((b"".join(body), False))
    return out


def _parts(tokens: list[int], token_bytes, ids: dict[str, int]) -> list[tuple[str, bytes, bool]]:
    """Each call begun whose name is whole: (name, its arguments' bytes so far, whether the call is complete). In a
    call still being written, bytes that may yet be the closing fence ("\n```": JSON may hold a newline) are held
    back, so its arguments so far are always a prefix of what they are once it is complete."""
    out = []
    for raw, ended in _bodies(tokens, token_bytes, ids):
        name, found, args = raw.partition(_OPEN_ARGS)
        if not found:
            break  # its name is still being written (and no call comes after it yet)
        whole = ended and args.endswith(_CLOSE_ARGS)
        if whole:
            args = args[:-len(_CLOSE_ARGS)]
        elif not ended:
            held = next((k for k in range(min(len(args), len(_CLOSE_ARGS)), 0, -1)
                         if _CLOSE_ARGS.startswith(args[-k:])), 0)
            args = args[:len(args) - held]
        out.append((name.decode("utf-8", "replace"), args, whole))
    return out


def calls(tokens: list[int], token_bytes, ids: dict[str, int]) -> list[dict]:
    """The complete calls among an answer's tokens (from the calls' opening token on), in OpenAI's shape
    {"name", "arguments"} (arguments: the JSON text). A call cut short (max_tokens) is left out."""
    return [{"name": name, "arguments": args.decode("utf-8", "replace")}
            for name, args, whole in _parts(tokens, token_bytes, ids) if whole]


def progress(tokens: list[int], token_bytes, ids: dict[str, int]) -> list[tuple[str, bytes]]:
    """The calls begun so far whose name is whole, for a stream: (name, the bytes of its arguments so far), always
    a prefix of the arguments `calls` reads once the call is complete."""
    return [(name, args) for name, args, _ in _parts(tokens, token_bytes, ids)]


def describe(tools: list[dict]) -> str:
    """The tools as the system prompt tells the model about them (the template has no place for them)."""
    parts = ["## Tools", "", "You can call these functions:"]
    for tool in tools:
        f = tool["function"]
        parts += ["", f"### {f['name']}"]
        if f.get("description"):
            parts.append(f["description"])
        parts.append("Parameters: " + json.dumps(f.get("parameters") or {"type": "object", "properties": {}},
                                                 ensure_ascii=False))
    return "\n".join(parts)
