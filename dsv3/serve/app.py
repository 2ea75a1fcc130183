"""The HTTP side: an ASGI app (Starlette) speaking OpenAI's API over the scheduler.

Handlers run on the event loop and never touch the model: they validate, submit a `Request`, and
relay what the model thread emits (through `call_soon_threadsafe`) as one JSON answer or as
server-sent events. A client that goes away cancels its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from . import protocol
from .metrics import Metrics
from .protocol import ApiError, choice, chunk, complete, join_logprobs, logprobs_body, new_id, now, parse, usage
from .scheduler import QueueFull, Request, Scheduler
from .text import TextStream, offsets

log = logging.getLogger("dsv3")
MAX_BODY = 16 << 20  # bytes: a prompt far beyond any context still fits


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Answer:
    """One choice of a request (protocol.Choice, its scheduler Request) while its events arrive: the text, token
    ids and logprobs gathered so far, and how to write them as an entry of the answer's `choices`."""

    def __init__(self, index: int, spec, req: Request, parsed, want_lp: bool, decode):
        self.index, self.spec, self.req, self.decode = index, spec, req, decode
        self.chat, self.want_lp = parsed.chat, want_lp
        self.prompt_text = ""  # echoed; completions' text_offset counts from its end
        if parsed.echo or (want_lp and not parsed.chat):
            self.prompt_text = spec.prompt_text if spec.prompt_text is not None else decode(spec.prompt)
        self.echo = self.echo_due = parsed.echo  # echo_due: a stream has yet to send the prompt
        self.ids = [] if parsed.return_token_ids else None
        self.text, self.lps, self.lp_at, self.prompt_lps = [], [], [], []  # lp_at: where each token's text starts
        self.emitted = len(self.prompt_text)
        self.finish: str | None = None
        self.calls: list[dict] | None = None  # the tools the answer called (OpenAI's tool_calls entries)

    def take(self, kind: str, data, keep: bool = True) -> None:
        """A scheduler event ("text", "prompt" or "done"); keep: gather the answer (else only count where it is)."""
        if kind == "text":
            if keep:
                self.lp_at.extend([self.emitted] * len(data[2] or []))
                self.text.append(data[0])
                self.lps.extend(data[2] or [])
                if self.ids is not None:
                    self.ids.extend(data[1])
            self.emitted += len(data[0])
        elif kind == "prompt":
            self.prompt_lps.extend(data)
        elif kind == "tools":
            self.calls = protocol.tool_calls(data)
        elif kind == "done":
            self.finish = data

    def prompt_logprobs(self, piece) -> dict:
        return logprobs_body(self.chat, self.prompt_lps, piece, offsets(self.decode, self.req.prompt))

    def whole(self, piece) -> dict:
        body_lp = None
        if self.want_lp:
            body_lp = logprobs_body(self.chat, self.lps, piece, self.lp_at)
            if self.prompt_lps:
                body_lp = join_logprobs(self.prompt_logprobs(piece), body_lp)
        text = (self.prompt_text if self.echo else "") + "".join(self.text)
        return choice(self.index, self.chat, text, self.finish, self.ids, body_lp, tool_calls=self.calls)

    def delta(self, text: str | None, ids=(), logprobs: dict | None = None, first: bool = False,
              finish: str | None = None) -> dict:
        """A stream chunk's entry in `choices` (`ids`: its token ids, sent where asked)."""
        return choice(self.index, self.chat, text, finish, None if self.ids is None else list(ids), logprobs,
                      stream=True, first=first)

    def echo_piece(self, piece) -> dict:
        return choice(self.index, self.chat, self.prompt_text, None, None if self.ids is None else [],
                      self.prompt_logprobs(piece) if self.want_lp else None, stream=True)


class _Exchange:
    """One HTTP request's answers in flight: the scheduler's events for them (queued by the model thread through
    the event loop), gathered into one JSON answer or relayed as server-sent events."""

    def __init__(self, api: "_Api", parsed, chat: bool):
        self.api, self.parsed, self.chat = api, parsed, chat
        self.want_lp = parsed.choices[0].params.logprobs is not None
        self.events = asyncio.Queue()  # (choice index, kind, data) of every answer, as the model thread delivers them
        self.rid, self.created = new_id(chat), now()
        rid, decode, events = self.rid, api.tokenizer.decode, self.events
        self.answers = [_Answer(i, ch, Request(rid if len(parsed.choices) == 1 else f"{rid}-{i}", ch.prompt, ch.params,
                                               lambda kind, data, i=i: events.put_nowait((i, kind, data)),
                                               TextStream(decode, ch.params.stop)),
                                parsed, self.want_lp, decode)
                        for i, ch in enumerate(parsed.choices)]
        first = {}  # the first answer of each prompt reads it; the prompt's other answers take a copy (n > 1)
        for a in self.answers:
            a.req.leader = first.setdefault(a.spec.prompt_index, a.req)
            if a.req.leader is a.req:
                a.req.leader = None

    def chunk(self, entries: list[dict], use: dict | None = None) -> str:
        """A server-sent event of these `choices` entries (the last: none, and the usage)."""
        return _sse(chunk(self.rid, self.api.model_name, self.created, self.chat, entries, use))

    def use(self) -> dict:
        """Tokens used; each prompt counts once, however many answers it has (OpenAI's n)."""
        prompts = {}  # each prompt's first answer: the one that read it (the others copied its entries)
        for a in self.answers:
            prompts.setdefault(a.spec.prompt_index, a.req)
        return usage(sum(len(r.prompt) for r in prompts.values()), sum(a.req.generated for a in self.answers),
                     sum(r.reused for r in prompts.values()))

    def cancel_open(self) -> None:
        for a in self.answers:
            if a.finish is None:  # the client went away (or another answer failed): free the slot now
                self.api.scheduler.cancel(a.req)
                self.api.metrics.request("cancelled")

    async def whole(self) -> JSONResponse:
        api = self.api
        try:
            while any(a.finish is None for a in self.answers):
                i, kind, data = await self.events.get()
                a = self.answers[i]
                if kind == "error":
                    api.metrics.request("error")
                    return _error(ApiError(500, data, None, "model_error", "server_error"))
                a.take(kind, data)
                if kind == "done":
                    api.metrics.request(data)
        finally:
            self.cancel_open()
        return JSONResponse(complete(self.rid, api.model_name, self.created, self.chat,
                                     [a.whole(api.piece) for a in self.answers], self.use()))

    async def stream(self):
        api, chat, piece = self.api, self.chat, self.api.piece
        try:
            if chat:
                for a in self.answers:
                    yield self.chunk([a.delta("", first=True)])
            while any(a.finish is None for a in self.answers):
                i, kind, data = await self.events.get()
                a = self.answers[i]
                if kind == "error":
                    yield _sse(ApiError(500, data, None, "model_error", "server_error").body())
                    api.metrics.request("error")
                    break
                if a.echo_due and kind in ("text", "done"):  # the prompt first, its logprobs complete by now
                    a.echo_due = False
                    yield self.chunk([a.echo_piece(piece)])
                a.take(kind, data, keep=False)
                if kind == "text":
                    if not data[0] and a.ids is None and not data[2]:
                        continue  # a token whose text is still incomplete (or held for a stop string)
                    body_lp = None
                    if self.want_lp:
                        body_lp = logprobs_body(chat, data[2], piece, [a.emitted - len(data[0])] * len(data[2]))
                    yield self.chunk([a.delta(data[0], data[1], body_lp)])
                elif kind == "tool_delta":  # as OpenAI streams calls: id and name first, then argument pieces
                    # (the whole calls' "tools" event adds nothing here: its calls came as these deltas)
                    entries = [{"index": j, **protocol.tool_calls([{"name": name, "arguments": text}])[0]}
                               if name is not None else {"index": j, "function": {"arguments": text}}
                               for j, name, text in data]
                    yield self.chunk([choice(a.index, chat, None, None, stream=True, tool_calls=entries)])
                elif kind == "done":
                    api.metrics.request(data)
                    yield self.chunk([a.delta(None, finish=data)])
            else:
                if self.parsed.include_usage:
                    yield self.chunk([], self.use())
            yield "data: [DONE]\n\n"
        finally:
            self.cancel_open()


class _Api:
    """The routes' handlers over one scheduler: authentication, the request body, and each generation request as
    an _Exchange."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_name: str, api_key: str | None, metrics: Metrics):
        self.scheduler, self.tokenizer, self.model_name, self.api_key = scheduler, tokenizer, model_name, api_key
        self.metrics = metrics
        self.loop = None  # the event loop, known from the first request on
        self.context, self.vocab = scheduler.max_len, scheduler.model.cfg.vocab_size
        self.started = now()
        self.piece = functools.lru_cache(maxsize=1 << 16)(self._piece)
        scheduler.observe = metrics.observe
        scheduler.deliver = self.deliver

    def deliver(self, batch) -> None:  # model thread: one wake-up of the event loop per step
        try:
            self.loop.call_soon_threadsafe(Scheduler.deliver_here, batch)
        except (RuntimeError, AttributeError):  # the loop is gone (shutdown) or never ran: nobody is listening
            pass

    def _piece(self, token: int) -> tuple[str, bytes]:
        """A token's name in logprobs and its bytes: its text, or where it holds part of a UTF-8 character (which
        text shows as U+FFFD), OpenAI's spelling of the bytes, "bytes:\\xe2\\x96"."""
        text, raw = self.tokenizer.decode([token], skip_special_tokens=False), self.tokenizer.token_bytes(token)
        if "\ufffd" in text:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, raw

    def authorized(self, request: HttpRequest) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())

    async def body_of(self, request: HttpRequest):
        if not self.authorized(request):
            raise ApiError(401, "incorrect API key provided; pass it as 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body has {len(raw)} bytes; the limit is {MAX_BODY}", None,
                           "request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None

    async def generate(self, request: HttpRequest, chat: bool):
        self.loop = self.loop or asyncio.get_running_loop()
        scheduler, metrics = self.scheduler, self.metrics
        try:
            parsed = parse(await self.body_of(request), chat, self.tokenizer, self.model_name, self.context,
                           self.vocab)
        except ApiError as e:
            metrics.request("rejected")
            return _error(e)
        if not scheduler.alive:
            return _error(ApiError(503, "the model loop is not running; see the server log", None, "unavailable",
                                   "server_error"))
        if len(parsed.choices) > scheduler.max_waiting:
            metrics.request("rejected")
            return _error(ApiError(400, f"this request asks for {len(parsed.choices)} answers (prompts x n); this "
                                   f"server queues at most {scheduler.max_waiting} (--max-waiting)", "n",
                                   "invalid_value"))
        exchange = _Exchange(self, parsed, chat)
        try:
            scheduler.submit(*(a.req for a in exchange.answers))
        except QueueFull as e:
            metrics.request("rejected")
            return _error(ApiError(429, f"the server is busy: {e}; retry later", None, "queue_full",
                                   "rate_limit_exceeded"))
        if not parsed.stream:
            return await exchange.whole()
        return StreamingResponse(exchange.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": exchange.rid})

    async def completions(self, request):
        return await self.generate(request, chat=False)

    async def chat_completions(self, request):
        return await self.generate(request, chat=True)

    async def models(self, request):
        if not self.authorized(request):
            return _error(ApiError(401, "incorrect API key provided; pass it as 'Authorization: Bearer KEY'", None,
                                   "invalid_api_key"))
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": self.started, "owned_by": "dsv3",
                                                         "max_model_len": self.context}]})

    async def health(self, request):
        scheduler = self.scheduler
        if scheduler.alive:
            return JSONResponse({"status": "ok", **scheduler.stats()})
        return JSONResponse({"status": "error", "error": str(scheduler.error or "the model loop is not running")},
                            status_code=503)

    async def prometheus(self, request):
        return PlainTextResponse(self.metrics.render({**self.scheduler.stats(), "max_batch": self.scheduler.max_batch}),
                                 media_type="text/plain; version=0.0.4")

    @staticmethod
    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))

    @staticmethod
    async def internal_error(request, exc: Exception):
        log.exception("request failed")
        return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error",
                               "server_error"))


def create_app(scheduler: Scheduler, tokenizer, model_name: str, api_key: str | None = None,
               metrics: Metrics | None = None) -> Starlette:
    api = _Api(scheduler, tokenizer, model_name, api_key, metrics or Metrics())
    routes = [Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/health", api.health, methods=["GET"]),
              Route("/metrics", api.prometheus, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: api.http_error, Exception: api.internal_error})
