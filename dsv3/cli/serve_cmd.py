from __future__ import annotations

import importlib.util
import signal
import socket
import sys
import threading
from pathlib import Path

import click

from ..core.errors import DsvError
from .options import load_options, progress_bar


@click.command()
@load_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default answers this machine only; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together: the latent cache holds this many sequences of --max-seq-len.")
@click.option("--max-waiting", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests queued for a slot beyond --max-batch; more are answered 429.")
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None,
              help="Context per request (prompt + completion); default min(max_position_embeddings, 4096).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=64, show_default=True,
              help="Prompt tokens read per step: smaller keeps running streams smoother while a long prompt is read.")
@click.option("--api-key", envvar="DSV3_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (also from $DSV3_API_KEY).")
@click.option("--served-model-name", default=None, help="The model id clients send (default: the checkpoint's directory name).")
@click.option("--attn", type=click.Choice(["auto", "naive", "absorb"]), default="auto", show_default=True,
              help="MLA form: auto = naive for prefill, absorbed for decode (and, where the backend finds it "
                   "cheaper, for prefill chunks: cpu in bf16, up to ~125 queries at V3's dims).")
@click.option("--speculative", type=click.Choice(["mtp"]), default=None,
              help="Draft with the checkpoint's MTP layer and verify the drafts in each decode step: the same greedy "
                   "tokens (the same distribution when sampling) in fewer steps. /metrics counts drafted and "
                   "accepted tokens.")
@click.option("--draft-tokens", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Drafts per request and step with --speculative (1 is the MTP layer's design).")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="A freed slot keeps its cache entries; a prompt that starts with them (the next turn of a chat, a "
                   "shared few-shot context) reads only the rest. Off: every prompt is read whole (bitwise-repeatable "
                   "answers in bf16).")
@click.pass_context
def serve(ctx, ckpt: Path, backend, dtype, device, cpu_weights, host, port, max_batch, max_waiting, max_seq_len, prefill_chunk,
          api_key, served_model_name, attn, speculative, draft_tokens, prefix_cache) -> None:
    """Serve a checkpoint over OpenAI's HTTP API, with continuous batching.

    \b
    Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming or not),
               GET /v1/models, GET /health, GET /metrics (Prometheus).
    \b
    Examples:
      dsv3 serve CKPT --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"model": "CKPT-NAME", "messages": [{"role": "user", "content": "Hi"}]}'
      torchrun --nproc-per-node 8 -m dsv3 serve CKPT    # tensor parallel: rank 0 serves HTTP
    """
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise DsvError(f"dsv3 serve needs {' and '.join(missing)}: pip install 'dsv3[serve]'")
    from .. import load
    from ..core.parallel import Parallel
    from ..serve.scheduler import Scheduler

    par = Parallel.from_env()
    sock = None
    if par.is_main:  # bind before the (long) load: a taken port fails in a second, not after minutes
        sock = listen_socket(host, port)
    update, close = progress_bar(sys.stderr.isatty() and par.is_main)
    try:
        engine = load(ckpt, backend=backend, dtype=dtype, device=device, attn_impl=attn, max_seq_len=max_seq_len,
                      parallel=par, progress=update, require_tokenizer=True, cpu_weights=cpu_weights)
    finally:
        close()
    eos = tuple(engine.cfg.eos_token_ids) + ((engine.tokenizer.eos_id,) if engine.tokenizer.eos_id is not None else ())
    scheduler = Scheduler(engine, max_batch=max_batch, max_waiting=max_waiting, prefill_chunk=prefill_chunk, eos_ids=eos,
                          speculative=speculative, draft_tokens=draft_tokens, prefix_cache=prefix_cache)
    if not par.is_main:
        scheduler.runner.follow()  # every rank runs rank 0's steps until it stops
        return
    scheduler.prepare_grammars()
    import uvicorn

    from ..serve.app import create_app

    name = served_model_name or ckpt.resolve().name
    app = create_app(scheduler, engine.tokenizer, name, api_key)
    bound = sock.getsockname()
    parser, event_loop = http_stack()
    click.echo(f"dsv3: serving {name!r} on http://{host if ':' not in host else f'[{host}]'}:{bound[1]} "
               f"({engine.kernels.describe()}; max batch {max_batch}, context {engine.max_seq_len}; "
               f"HTTP on {parser} + {event_loop}); Ctrl-C stops", err=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo("dsv3: warning: listening beyond this machine without --api-key", err=True)
    if (parser, event_loop) != ("httptools", "uvloop") and sys.platform != "win32":
        click.echo("dsv3: note: HTTP on pure-Python h11/asyncio; pip install 'dsv3[serve]' adds httptools and uvloop "
                   "(each decode step hands its tokens to the HTTP side faster: lower time per output token)", err=True)
    config = uvicorn.Config(app, http=parser, loop=event_loop, access_log=False, timeout_graceful_shutdown=5,
                            log_level="debug" if ctx.obj.get("verbose") else "warning")
    server = uvicorn.Server(config)
    # HTTP in a thread, the model in this (main) thread: torch runs its OpenMP regions fastest from here
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dsv3-http", daemon=True)
    scheduler.running = True  # /health is ok from the first request the backlog holds
    http.start()
    signal.signal(signal.SIGTERM, lambda *_: scheduler.shutdown())
    # Ctrl-C (SIGINT) stops the server however it was started: a job a non-interactive shell puts in the background
    # (a CI step, `cmd &` in a script) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        scheduler.run()
    except KeyboardInterrupt:
        click.echo("dsv3: stopping", err=True)
    finally:
        server.should_exit = True
        http.join(timeout=10)
        sock.close()


def http_stack() -> tuple[str, str]:
    """(HTTP parser, event loop) for uvicorn: httptools and uvloop (C; the `serve` extra) where installed, else
    uvicorn's pure-Python h11 on asyncio. Measured with 16 streaming clients on 2 cores: the model thread's hand-off
    of a step's tokens took 0.7-2.8 ms on h11/asyncio (it waits for the GIL the HTTP thread holds) and 0.05 ms on
    httptools/uvloop; p99 time per output token fell from 20-24 ms to 17 ms."""
    have = importlib.util.find_spec
    return ("httptools" if have("httptools") else "h11"), ("uvloop" if have("uvloop") else "asyncio")


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the (long) load so a taken port fails in a second. The protocol
    is named: asyncio turns Nagle off (TCP_NODELAY) only on connections whose socket says IPPROTO_TCP, and with
    Nagle on a streamed token waited for the client's delayed ACK of the previous write (+20 ms to every first
    token, measured on loopback)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until the app runs: the printed address works at once
    except OSError as e:
        sock.close()
        raise DsvError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or stop what uses it") from None
    return sock
