"""The checkpoint's own tokenizer (tokenizer.json) and chat template, from local files only.

No remote code and no hub access: `tokenizers` reads tokenizer.json, jinja2's sandbox renders
the chat template from tokenizer_config.json.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from .errors import DsvError


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte is a printable character, itself where it is one."""
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {chr(b): b for b in shown}, 0
    for b in range(256):
        if b not in shown:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise DsvError(
                f"{path}: no tokenizer.json; copy tokenizer.json and tokenizer_config.json from the original "
                "checkpoint into this directory (dsv3 convert copies them)"
            )
        try:
            self._tok = _Tok.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise DsvError(f"{tok_file}: cannot be read as a tokenizer ({e}); re-download it") from None
        cfg_file = path / "tokenizer_config.json"
        cfg = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise DsvError(f"{cfg_file}: not valid JSON ({e}); re-download it") from None
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", True))
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled `text` (a special token's name), or None where there is none."""
        return self._tok.token_to_id(text)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """The special tokens' ids (BOS, EOS, the chat roles...): markup, never text."""
        return frozenset(t for t, tok in self._tok.get_added_tokens_decoder().items() if tok.special)

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes. A byte-level BPE token may hold part of a UTF-8 character, which its decoded text
        shows as U+FFFD; its vocabulary entry spells the bytes. Special tokens and other tokenizers: the text's."""
        chars = self._byte_chars
        entry = self._tok.id_to_token(token)
        if chars is not None and entry and all(c in chars for c in entry):
            return bytes(chars[c] for c in entry)
        return self.decode([token], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def _byte_chars(self) -> dict[str, int] | None:
        """The byte-level alphabet where the tokenizer decodes byte-level (read once: tokenizer.json is MBs)."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        return _byte_level_chars() if "ByteLevel" in json.dumps(decoder) else None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation; without a template, the last user message as is."""
        if not self.chat_template:
            return "\n".join(m["content"] for m in messages)
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise DsvError(f"chat template failed: {e}; use --raw to send the prompt without the template") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the template writes the BOS token itself
        return self.encode(self.render_chat(messages), add_bos=False if self.chat_template else None)
