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

from .metrics import Metrics
from .protocol import ApiError, chunk, complete, join_logprobs, logprobs_body, new_id, now, parse, usage
from .scheduler import LOGPROBS_WITH_DRAFTS, QueueFull, Request, Scheduler
from .text import TextStream, offsets

log = logging.getLogger("dsv3")
MAX_BODY = 16 << 20  # bytes: a prompt far beyond any context still fits


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(scheduler: Scheduler, tokenizer, model_name: str, api_key: str | None = None,
               metrics: Metrics | None = None) -> Starlette:
    metrics = metrics or Metrics()
    scheduler.observe = metrics.observe
    loop = None

    def deliver(batch):  # model thread: one wake-up of the event loop per step
        try:
            loop.call_soon_threadsafe(Scheduler.deliver_here, batch)
        except (RuntimeError, AttributeError):  # the loop is gone (shutdown) or never ran: nobody is listening
            pass

    scheduler.deliver = deliver
    context, vocab = scheduler.max_len, scheduler.model.cfg.vocab_size

    @functools.lru_cache(maxsize=1 << 16)
    def piece(token: int) -> tuple[str, bytes]:
        """A token's name in logprobs and its bytes: its text, or where it holds part of a UTF-8 character (which
        text shows as U+FFFD), OpenAI's spelling of the bytes, "bytes:\\xe2\\x96"."""
        text, raw = tokenizer.decode([token], skip_special_tokens=False), tokenizer.token_bytes(token)
        if "\ufffd" in text:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, raw

    def authorized(request: HttpRequest) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode())

    async def body_of(request: HttpRequest):
        if not authorized(request):
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

    async def generate(request: HttpRequest, chat: bool):
        nonlocal loop
        loop = loop or asyncio.get_running_loop()
        try:
            parsed = parse(await body_of(request), chat, tokenizer, model_name, context, vocab)
        except ApiError as e:
            metrics.request("rejected")
            return _error(e)
        if not scheduler.alive:
            return _error(ApiError(503, "the model loop is not running; see the server log", None, "unavailable",
                                   "server_error"))
        want_lp = parsed.params.logprobs is not None
        if want_lp and scheduler.spec is not None:
            metrics.request("rejected")
            return _error(ApiError(400, LOGPROBS_WITH_DRAFTS, "logprobs", "unsupported_value"))
        prompt_text = ""
        if parsed.echo or (want_lp and not chat):  # the echoed text; completions' text_offset counts from its end
            prompt_text = parsed.prompt_text if parsed.prompt_text is not None else tokenizer.decode(parsed.prompt)
        events = asyncio.Queue()
        rid, created = new_id(chat), now()
        req = Request(rid, parsed.prompt, parsed.params, lambda kind, data: events.put_nowait((kind, data)),
                      TextStream(tokenizer.decode, parsed.params.stop))
        try:
            scheduler.submit(req)
        except QueueFull as e:
            metrics.request("rejected")
            return _error(ApiError(429, f"the server is busy: {e}; retry later", None, "queue_full",
                                   "rate_limit_exceeded"))
        ids = [] if parsed.return_token_ids else None
        prompt_lps, lps, lp_at = [], [], []  # lp_at: where each answer token's text starts (completions)

        def prompt_offsets() -> list[int]:
            return offsets(tokenizer.decode, req.prompt)

        if not parsed.stream:
            text, finish, emitted = [], None, len(prompt_text)
            try:
                while finish is None:
                    kind, data = await events.get()
                    if kind == "text":
                        lp_at.extend([emitted] * len(data[2] or []))
                        emitted += len(data[0])
                        text.append(data[0])
                        if ids is not None:
                            ids.extend(data[1])
                        lps.extend(data[2] or [])
                    elif kind == "prompt":
                        prompt_lps.extend(data)
                    elif kind == "done":
                        finish = data
                    else:
                        metrics.request("error")
                        return _error(ApiError(500, data, None, "model_error", "server_error"))
            finally:
                if finish is None:  # the client went away while waiting
                    scheduler.cancel(req)
                    metrics.request("cancelled")
            metrics.request(finish)
            body_lp = None
            if want_lp:
                body_lp = logprobs_body(chat, lps, piece, lp_at)
                if prompt_lps:
                    body_lp = join_logprobs(logprobs_body(chat, prompt_lps, piece, prompt_offsets()), body_lp)
            text = (prompt_text if parsed.echo else "") + "".join(text)
            return JSONResponse(complete(rid, model_name, created, chat, text, finish,
                                         usage(len(req.prompt), req.generated), ids, body_lp))

        async def stream():
            finish, echo, emitted = None, parsed.echo, len(prompt_text)
            try:
                if chat:
                    yield _sse(chunk(rid, model_name, created, True, "", None, [] if ids is not None else None, True))
                while finish is None:
                    kind, data = await events.get()
                    if kind == "prompt":
                        prompt_lps.extend(data)
                        continue
                    if echo and kind in ("text", "done"):  # the prompt first, its logprobs complete by now
                        echo = False
                        yield _sse(chunk(rid, model_name, created, chat, prompt_text, None,
                                         [] if ids is not None else None,
                                         logprobs=logprobs_body(chat, prompt_lps, piece, prompt_offsets())
                                         if want_lp else None))
                    if kind == "text":
                        if not data[0] and ids is None and not data[2]:
                            continue  # a token whose text is still incomplete (or held for a stop string)
                        body_lp = None
                        if want_lp:
                            body_lp = logprobs_body(chat, data[2], piece, [emitted] * len(data[2]))
                        emitted += len(data[0])
                        yield _sse(chunk(rid, model_name, created, chat, data[0], None,
                                         data[1] if ids is not None else None, logprobs=body_lp))
                    elif kind == "done":
                        finish = data
                        yield _sse(chunk(rid, model_name, created, chat, None, finish))
                        if parsed.include_usage:
                            yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                        "created": created, "model": model_name, "choices": [],
                                        "usage": usage(len(req.prompt), req.generated)})
                    else:
                        finish = "error"
                        yield _sse(ApiError(500, data, None, "model_error", "server_error").body())
                yield "data: [DONE]\n\n"
                metrics.request(finish)
            finally:
                if finish is None:  # disconnected mid-stream: free the slot now, not at max_tokens
                    scheduler.cancel(req)
                    metrics.request("cancelled")

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def models(request):
        if not authorized(request):
            return _error(ApiError(401, "incorrect API key provided; pass it as 'Authorization: Bearer KEY'", None,
                                   "invalid_api_key"))
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                                         "owned_by": "dsv3", "max_model_len": context}]})

    async def health(request):
        if scheduler.alive:
            return JSONResponse({"status": "ok", **scheduler.stats()})
        return JSONResponse({"status": "error", "error": str(scheduler.error or "the model loop is not running")},
                            status_code=503)

    async def prometheus(request):
        return PlainTextResponse(metrics.render({**scheduler.stats(), "max_batch": scheduler.max_batch}),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))

    async def internal_error(request, exc: Exception):
        log.exception("request failed")
        return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error",
                               "server_error"))

    started = now()
    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})
