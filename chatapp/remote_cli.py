"""Command-line side of remote backends: --endpoint/--api-key-env and `deltatalk run --endpoint`."""

from __future__ import annotations

import argparse
import json
import sys
import threading

REMOTE_ONLY_LOCAL = ("prompt_ids", "raw", "logits_out", "script")


def add_endpoint_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("remote model (any OpenAI-compatible server)")
    g.add_argument("--endpoint", default=None, metavar="URL",
                   help="chat with a model on an OpenAI-compatible server, e.g. http://localhost:11434/v1 "
                        "(then -m/--model names the server's model; default: its first)")
    g.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="the environment variable holding the server's API key")


def cmd_run_remote(args) -> int:
    """`deltatalk run --endpoint URL`: one reply from a remote server, with the local run's --json fields."""
    from engine import runtime

    from chatapp.cli_common import chat_messages, sampling_from_args
    from chatapp.remote import OpenAIEndpoint, ReplyFigures, RemoteError, api_key_from_env, stream_reply

    used = [f"--{n.replace('_', '-')}" for n in REMOTE_ONLY_LOCAL if getattr(args, n, None)]
    if used:
        print(f"deltatalk: {', '.join(used)} need a local model; not available with --endpoint", file=sys.stderr)
        return 2
    settings = sampling_from_args(args)
    try:
        endpoint = OpenAIEndpoint(args.endpoint, api_key_from_env(args.api_key_env))
        model = args.model
        if not model:
            models = endpoint.models()
            if not models:
                raise RemoteError(f"{endpoint.url} lists no models")
            model = models[0]["id"]
        body = endpoint.request_body(model, chat_messages(args.system, args.prompt), settings, args.max_tokens)
        f = ReplyFigures()
        cancel = threading.Event()
        try:
            for r in stream_reply(endpoint, body, cancel, f):
                if not args.json and r.text:
                    sys.stdout.write(r.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            cancel.set()
            raise
    except RemoteError as e:
        if e.partial and not args.json:
            sys.stdout.write("\n")
        print(f"deltatalk: {e}", file=sys.stderr)
        return 1   # a runtime error, as every other command
    result = {
        "model": model,
        "endpoint": endpoint.url,
        "prompt_token_ids": None,            # the server's tokenizer is not ours
        "generated_token_ids": None,
        "text": f.text,
        "stop_reason": f.finish,
        "prompt_tokens": f.prompt_tokens,
        "prompt_tokens_estimated": f.prompt_tokens is None,
        "cached_tokens": f.cached_tokens,
        "prompt_tps": f.prompt_tps,
        "ttft_s": f.ttft_s,
        "generated_tokens": f.completion_tokens,
        "generated_tokens_estimated": f.completion_estimated,
        "decode_tps": f.decode_tps,
        "peak_rss_bytes": runtime.peak_rss_bytes(),
        "threads": None,
        "thread_policy": None,   # the threads are the server's
    }
    if result["prompt_tokens"] is None:   # roughly 4 characters a token
        result["prompt_tokens"] = max(1, sum(len(m["content"]) for m in body["messages"]) // 4)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        est = lambda k: "~" if result[k + "_estimated"] else ""  # noqa: E731
        cached = f", {f.cached_tokens} cached" if f.cached_tokens is not None else ""
        print(f"[{est('prompt_tokens')}{result['prompt_tokens']} prompt tokens{cached}, ttft "
              f"{f.ttft_s * 1000:.0f} ms | {est('generated_tokens')}{f.completion_tokens} tokens, "
              f"{f.decode_tps:.1f} tok/s decode (at the client) | stop: {f.finish} | {endpoint.url}]",
              file=sys.stderr)
    return 0


def cmd_chat_remote(args) -> int:
    """`deltatalk --endpoint URL [-m NAME] [--api-key-env VAR]`: the TUI on a remote model."""
    from chatapp.app import run_tui
    from chatapp.cli_common import given_sampling
    from chatapp.remote import RemoteChoice, RemoteError, api_key_from_env, normalize_url

    if args.plain:
        print("deltatalk: --plain needs a local model; not available with --endpoint", file=sys.stderr)
        return 2
    try:
        url = normalize_url(args.endpoint)
        api_key_from_env(args.api_key_env)   # a missing variable is said here, before the screen opens
    except RemoteError as e:
        print(f"deltatalk: {e}", file=sys.stderr)
        return 2
    return run_tui(threads=args.threads, ctx=args.ctx, system=args.system, sampling=given_sampling(args),
                   max_tokens=args.max_tokens, endpoint=RemoteChoice(url, args.model, args.api_key_env))
