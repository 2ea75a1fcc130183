"""Token masks for grammar-constrained sampling (json_mode.py's JSON objects, tools.py's tool calls).

A grammar is a byte automaton with a few special tokens: `start`, `step(state, byte)`, `special(state, token)`
(None: not allowed there), `ends(state)` (EOS allowed), `free(state)` (any text token goes and leaves the state
as it is: a tool-calling answer's prose) and `in_string(state)` (inside a JSON string: a token without a quote,
backslash or control byte leaves the state as it is); optionally `counted(state)`: inside a string whose length is
bounded, (the state with the count left out, or None between characters of a string without a pattern: then every
token of plain string bytes that is well-formed UTF-8 goes on; the characters still allowed, or None; None, or
`live(end, k)`: whether a token that leaves the count-free walk at state `end` having begun k characters keeps the
string able to end), else None. States are hashable; a grammar is hashable too.

A mask is computed by walking the vocabulary as a trie (the tokens sorted by their bytes: a prefix that breaks
the grammar rules out every token that starts with it), so a state costs its viable prefixes, not the vocabulary;
a large subtree whose every remaining byte leaves its state as it is (digits inside a number, letters inside a
string) is taken whole; the free and in-string cases start from a precomputed mask, and a counted string from the
mask of its count-free state (cached) cut to the tokens whose characters fit. Masks are cached by (grammar,
state) on the model's device. benchmarks/grammar_masks.py measures all of it.
"""

from __future__ import annotations

import functools
from bisect import bisect_left

import torch


def _plain(data: bytes) -> bool:
    """Inside a string, these bytes leave it as it was whatever they are: no quote, backslash or control byte."""
    return all(c >= 0x20 and c not in (0x22, 0x5C) for c in data)


_SECOND = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _utf8(data: bytes) -> bool:
    """Well-formed UTF-8 from a character's start (RFC 3629: no overlong forms, surrogates or bytes past U+10FFFF),
    the last character possibly cut short."""
    i = 0
    while i < len(data):
        c = data[i]
        size = 1 if c < 0x80 else 2 if 0xC2 <= c <= 0xDF else 3 if 0xE0 <= c <= 0xEF else 4 if 0xF0 <= c <= 0xF4 else 0
        if not size:
            return False
        second = _SECOND.get(c, (0x80, 0xBF))  # the leads whose second byte rules out overlong forms and surrogates
        for j, b in enumerate(data[i + 1:i + size], 1):
            if not (second[0] <= b <= second[1] if j == 1 else 0x80 <= b <= 0xBF):
                return False
        i += size
    return True


#: a subtree this large is first checked whole: do all its remaining bytes leave the state as it is?
_WHOLE = 6


class _Trie:
    """Tokens sorted by their bytes: a node is a range of them sharing a prefix (no objects per node)."""

    def __init__(self, items: list[tuple[bytes, int]]):
        items.sort()
        self.keys = [b for b, _ in items]
        self.ids = [t for _, t in items]
        self._rest: dict[tuple[int, int], frozenset] = {}  # (lo, depth) -> the bytes the subtree holds from depth on

    def _bytes_below(self, lo: int, hi: int, depth: int) -> frozenset:
        key = (lo, depth)
        if key not in self._rest:
            self._rest[key] = frozenset(b"".join(k[depth:] for k in self.keys[lo:hi]))
        return self._rest[key]

    def walk(self, step, st, out: list[int], ends: list | None = None) -> None:
        """Append every token whose bytes continue st under step(state, byte) (depth first; a breaking prefix
        prunes its subtree), and to `ends` (where given) the state after each. A large subtree whose bytes all loop
        on its state (digits inside a number, letters inside a string) is taken whole, without a step per token."""
        keys, ids, todo, loops = self.keys, self.ids, [(0, len(self.keys), 0, st)], {}
        while todo:
            lo, hi, depth, s = todo.pop()
            if hi - lo >= _WHOLE and depth:
                known = loops.setdefault(s, {})  # byte -> it loops on s (asked once per walk)
                for c in self._bytes_below(lo, hi, depth):
                    if c not in known:
                        known[c] = step(s, c) == s
                    if not known[c]:
                        break
                else:
                    out.extend(ids[lo:hi])
                    if ends is not None:
                        ends.extend([s] * (hi - lo))
                    continue
            while lo < hi and len(keys[lo]) == depth:  # tokens that end here (they sort first)
                out.append(ids[lo])
                if ends is not None:
                    ends.append(s)
                lo += 1
            while lo < hi:
                c = keys[lo][depth]
                end = hi if c == 255 else bisect_left(keys, keys[lo][:depth] + bytes((c + 1,)), lo, hi)
                nxt = step(s, c)
                if nxt is not None:
                    todo.append((lo, end, depth + 1, nxt))
                lo = end


class Vocab:
    """A vocabulary as grammars see it. token_bytes: each token's bytes, None for special tokens (markup: a
    grammar's `special` decides them); eos_ids: the tokens that end an answer (a grammar's `ends`); device: where
    masks are used (each is copied there once, when its state is first met)."""

    def __init__(self, token_bytes: list[bytes | None], eos_ids, device: torch.device | str = "cpu"):
        self.vocab, self.device = len(token_bytes), device
        self.bytes = [b or b"" for b in token_bytes]  # what a token adds to the answer's bytes
        self.eos = frozenset(t for t in eos_ids if 0 <= t < self.vocab)
        self.specials = [t for t, b in enumerate(token_bytes) if b is None and t not in self.eos]
        usable = [(b, t) for t, b in enumerate(token_bytes) if b]
        self.text = torch.zeros(self.vocab, dtype=torch.bool)
        self.text[[t for _, t in usable]] = True
        self.plain = torch.zeros(self.vocab, dtype=torch.bool)
        self.plain[[t for b, t in usable if _plain(b)]] = True
        # the characters each token begins (its bytes but UTF-8 continuation bytes): what a counted string counts
        self.chars = torch.tensor([sum(not 0x80 <= c <= 0xBF for c in b) for b in self.bytes], dtype=torch.int32)
        self.plains = _Trie([(b, t) for b, t in usable if _plain(b)])
        self.utf8 = torch.zeros(self.vocab, dtype=torch.bool)  # plain, and well-formed UTF-8 (its last character may
        self.utf8[[t for b, t in usable if _plain(b) and _utf8(b)]] = True  # be cut: the next token ends it)
        self.everything = _Trie(usable)
        self.others = _Trie([(b, t) for b, t in usable if not _plain(b)])  # what plain strings do not cover

    @classmethod
    def of(cls, tokenizer, eos_ids, vocab: int, device: torch.device | str = "cpu", markup=()) -> Vocab:
        """From the checkpoint's tokenizer: its special tokens and `markup` (tokens a grammar places itself, such as
        the tool-call markers, whether or not the tokenizer flags them special) are markup, not text; ids past its
        vocabulary (the model's padding rows) are never allowed."""
        n, markup = min(vocab, tokenizer.vocab_size), tokenizer.special_ids | set(markup)
        pieces = [None if t in markup else tokenizer.token_bytes(t) for t in range(n)]
        return cls(pieces + [None] * (vocab - n), eos_ids, device)

    def advance(self, grammar, st, token: int):
        """The state after `token` (None: the grammar does not allow it there)."""
        if st is None:
            return None
        if token in self.eos:
            return st if grammar.ends(st) else None
        if not self.bytes[token]:
            return grammar.special(st, token)
        if grammar.free(st):
            return st
        for c in self.bytes[token]:
            st = grammar.step(st, c)
            if st is None:
                return None
        return st

    @functools.lru_cache(maxsize=512)
    def allowed(self, grammar, st) -> torch.Tensor:
        """[V] bool: the tokens that may follow state st (read-only: shared between callers)."""
        ids: list[int] = []
        counted = getattr(grammar, "counted", None)
        split = counted(st) if counted is not None else None
        if grammar.free(st):
            mask = self.text.clone()
        elif split is not None:
            base, room, live = split
            if base is None:
                mask = self.utf8.clone()
            else:  # the plain tokens from the count-free state (with a pattern: by where each ends, and its length)
                mask = torch.zeros(self.vocab, dtype=torch.bool)
                for end, toks, chars in self._plain_ends(grammar, base):
                    if live is not None:
                        fit = [k for k in chars.unique().tolist() if live(end, k)]
                        toks = toks[torch.isin(chars, torch.tensor(fit, dtype=chars.dtype))]
                    mask[toks] = True
            if room is not None:
                mask &= self.chars <= room
            self.others.walk(grammar.step, st, ids)
        elif grammar.in_string(st):
            mask = self.plain.clone()
            self.others.walk(grammar.step, st, ids)
        else:
            mask = torch.zeros(self.vocab, dtype=torch.bool)
            self.everything.walk(grammar.step, st, ids)
        ids += [t for t in self.specials if grammar.special(st, t) is not None]
        if grammar.ends(st) or (not ids and not mask.any()):  # nothing else to go on with: let the answer end
            ids += self.eos
        mask[ids] = True
        return mask.to(self.device)

    @functools.lru_cache(maxsize=64)
    def _plain_ends(self, grammar, st) -> list[tuple]:
        """The tokens of plain string bytes that continue st, by the state each ends in: [(state, ids, characters
        each begins)]."""
        ids: list[int] = []
        ends: list = []
        self.plains.walk(grammar.step, st, ids, ends)
        groups: dict = {}
        for t, end in zip(ids, ends):
            groups.setdefault(end, []).append(t)
        return [(end, torch.tensor(toks), self.chars[toks]) for end, toks in groups.items()]
