"""`deltatalk serve`: its arguments and start-up (kept apart from chatapp/cli.py's parsers)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time

from chatapp import arg_types as A

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_CACHE_MB = 1024
DEFAULT_QUEUE = 8


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions "
                                   "(streamed and not). Follow-up requests reuse the kept conversations' caches.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    p.add_argument("-m", "--model", type=A.existing_file("model file"),
                   help="path to a .gguf file (default: the default model, fetched if missing)")
    p.add_argument("--threads", type=A.int_in(1, A.MAX_THREADS), default=None,
                   help="compute threads, fixed (default: the physical cores, fewer while the CPU is busy)")
    p.add_argument("--ctx", type=A.context_size, default=None,
                   help="context size in tokens, 16 up to the model's training context (default: min(model, 8192))")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=A.int_in(0, 65535), default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: the DELTATALK_API_KEY variable, else none)")
    p.add_argument("--cache-mb", type=A.int_in(1, 1 << 20), default=DEFAULT_CACHE_MB,
                   help=f"memory for kept conversations' caches (LRU; default {DEFAULT_CACHE_MB})")
    p.add_argument("--queue", type=A.int_in(0, 10_000), default=DEFAULT_QUEUE,
                   help=f"requests that may wait while one generates (default {DEFAULT_QUEUE}); more get 503")
    p.add_argument("--model-id", default=None, help="the model's name in the API (default: the file name without .gguf)")
    from chatapp.cli_common import add_speculate_args

    add_speculate_args(p)   # one Speculator per kept conversation; the same tokens, sooner
    return p


def check_serve_args(args) -> str | None:
    """A one-line problem with the arguments, or None."""
    if not 0 <= args.port <= 65535:
        return "--port must be in 0..65535"
    if args.cache_mb < 1:
        return "--cache-mb must be >= 1"
    if args.queue < 0:
        return "--queue must be >= 0"
    if args.threads is not None and args.threads < 1:
        return "--threads must be >= 1"
    if args.ctx is not None and args.ctx < 16:
        return "--ctx must be >= 16"
    if args.api_key is not None and not args.api_key.strip():
        return "--api-key must not be empty"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The loud warning for a server reachable from other machines without a key."""
    if is_loopback(host) or api_key:
        return None
    bar = "!" * 78
    return (f"{bar}\n!! WARNING: serving on {host} WITHOUT an API key: anyone who can reach this port can use\n"
            f"!! the model (and so run up this machine's CPU and memory). Pass --api-key KEY (or set\n"
            f"!! DELTATALK_API_KEY), or bind {DEFAULT_HOST}.\n{bar}")


def cmd_serve(args) -> int:
    import uvicorn

    from engine import runtime
    from engine.kernel_thread import kernel_thread
    from engine.loader import load_model
    from engine.warmup import warm_up

    from chatapp.cli_common import resolve_model, speculator_factory
    from chatapp.backend import model_figures
    from chatapp.server.http import make_app
    from chatapp.server.worker import ServeEngine

    problem = check_serve_args(args)
    if problem:
        print(f"deltatalk: {problem}", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("DELTATALK_API_KEY") or None
    warning = exposure_warning(args.host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    path = resolve_model(args.model)
    loaded = load_model(path, n_ctx=args.ctx)
    make_speculator = speculator_factory(args, loaded) if args.speculate != "off" else None   # refuses a bad pair now

    def prepare():   # threads are per thread in numba: set them where the kernels run
        threads = runtime.set_threads(args.threads)
        warm_up(loaded.model, say=lambda s: print(s, file=sys.stderr, flush=True))
        return threads

    threads = kernel_thread().call(prepare)
    model_id = args.model_id or (path.name[:-5] if path.name.endswith(".gguf") else path.name)
    engine = ServeEngine(loaded, model_id, args.cache_mb << 20, make_speculator)
    app = make_app(engine, api_key=api_key, max_queue=args.queue)
    try:
        sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host
                                    else socket.AF_INET, reuse_port=False)
    except OSError as e:
        print(f"deltatalk: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    spec = f", --speculate {args.speculate}" if make_speculator is not None else ""
    print(f"deltatalk serve: {model_id} ({loaded.arch}, ctx {model_figures(loaded).n_ctx}, {threads} threads{spec}) on "
          f"http://{host}:{port}/v1{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    t0 = time.perf_counter()
    server.run(sockets=[sock])
    print(f"deltatalk serve: stopped after {time.perf_counter() - t0:.0f} s, {engine.served} requests", file=sys.stderr)
    return 0
