"""The `deltatalk` command: chat, run, bench, models, fetch, serve."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from engine.errors import DeltatalkError

# The model used when -m is not given.
DEFAULT_MAX_TOKENS = 512


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", help="path to a .gguf file (default: the default model, fetched if missing)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: min(model, 8192))")


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--temp", type=float, default=0.7, help="temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="deltatalk", description="Private terminal chat for local GGUF models.")
    sub = ap.add_subparsers(dest="command")

    chat = sub.add_parser("chat", help="chat in the terminal (the default command)")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--plain", action="store_true", help="a line-based chat instead of the full-screen app")

    run = sub.add_parser("run", help="answer one prompt on stdout")
    _add_model_args(run)
    _add_sampling_args(run)
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="the user message")
    src.add_argument("--prompt-ids", help="comma-separated token ids fed as-is")
    src.add_argument("--script", type=Path,
                     help='replay a conversation: {"system": "...", "steps": [{"user": "..."}, '
                          '{"regenerate": true}, {"edit": "..."}]}; each step may set "max_tokens"')
    run.add_argument("--system", default=None, help="system prompt")
    run.add_argument("--raw", action="store_true", help="feed the prompt text as-is: no chat template")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    run.add_argument("--logits-out", type=Path, help="save float32 logits of every generated position (.npy)")

    bench = sub.add_parser("bench", help="prefill and decode speed (medians of interleaved runs)")
    _add_model_args(bench)
    bench.add_argument("--pp", default="128,512", help="prompt lengths to time (comma-separated)")
    bench.add_argument("--tg", type=int, default=128, help="tokens to decode")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--peer", action="store_true",
                       help="also run llama.cpp (llama-cpp-python) on the same file, interleaved, with ratios")
    bench.add_argument("--peer-python", default=None,
                       help="a Python that has llama-cpp-python (default: this one; see the `peer` extra)")

    sub.add_parser("fetch", help="download the default model (if missing) and exit")
    models = sub.add_parser("models", help="list the GGUF files found")
    models.add_argument("--json", action="store_true")
    from chatapp.remote_cli import add_endpoint_args
    from chatapp.server.cli import add_serve_parser

    add_endpoint_args(chat)
    add_endpoint_args(run)
    add_serve_parser(sub)
    return ap


COMMANDS = ("chat", "run", "bench", "fetch", "models", "serve")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deltatalk [-m FILE ...]` is `deltatalk chat [-m FILE ...]`
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["chat"] + argv
    args = build_parser().parse_args(argv)
    cmd = args.command
    try:
        if cmd == "fetch":
            from chatapp.default_model import ensure_default_model

            ensure_default_model(say=lambda s: print(s, file=sys.stderr), verify_existing=True)
            return 0
        if cmd == "models":
            return cmd_models(args)
        if cmd == "serve":
            from chatapp.server.cli import cmd_serve

            return cmd_serve(args)
        if cmd == "run":
            if args.endpoint:
                from chatapp.remote_cli import cmd_run_remote

                return cmd_run_remote(args)
            return cmd_run(args)
        if cmd == "bench":
            from chatapp.bench_cli import cmd_bench

            return cmd_bench(args)
        return cmd_chat(args)
    except DeltatalkError as e:
        print(f"deltatalk: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


def resolve_model(path: str | None) -> Path:
    if path:
        return Path(path).expanduser()
    from chatapp.default_model import ensure_default_model

    return ensure_default_model(say=lambda s: print(s, file=sys.stderr))


def open_model(args, quiet: bool = False):
    """Load the model named by the args, set threads, and compile/warm the kernels visibly."""
    from engine import runtime
    from engine.loader import load_model
    from engine.warmup import warm_up

    runtime.set_threads(args.threads)
    path = resolve_model(args.model)
    loaded = load_model(path, n_ctx=args.ctx)
    t = time.perf_counter()
    warm_up(loaded.model, say=None if quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    return loaded, time.perf_counter() - t


def _sampling(args):
    from engine.sampling import SamplingSettings

    return SamplingSettings(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                            seed=args.seed).validate()


def _messages(system: str | None, user: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def load_script(path: Path) -> dict:
    """Read and check a conversation script; raise ValueError with what is wrong."""
    try:
        script = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(script, dict) or not isinstance(script.get("steps"), list) or not script["steps"]:
        raise ValueError(f'{path}: expected {{"system": "...", "steps": [...]}} with at least one step')
    if not isinstance(script.get("system", ""), str):
        raise ValueError(f"{path}: system must be a string")
    for i, step in enumerate(script["steps"]):
        kinds = [k for k in ("user", "regenerate", "edit") if k in step] if isinstance(step, dict) else []
        if len(kinds) != 1:
            raise ValueError(f'{path}: step {i} must have exactly one of "user", "regenerate", "edit"')
        if kinds[0] in ("user", "edit") and not isinstance(step[kinds[0]], str):
            raise ValueError(f"{path}: step {i}: {kinds[0]} must be a string")
        if "max_tokens" in step and (not isinstance(step["max_tokens"], int) or step["max_tokens"] < 1):
            raise ValueError(f"{path}: step {i}: max_tokens must be a positive integer")
    return script


def cmd_script(args, loaded, settings) -> int:
    """Replay a scripted conversation through one ChatSession; report each step."""
    from engine.session import ChatSession

    try:
        script = load_script(args.script)
    except ValueError as e:
        print(f"deltatalk: {e}", file=sys.stderr)
        return 2
    session = ChatSession(loaded)
    messages = [{"role": "system", "content": script["system"]}] if script.get("system") else []
    for i, step in enumerate(script["steps"]):
        if "user" in step:
            messages.append({"role": "user", "content": step["user"]})
            label = step["user"]
        else:
            if messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if not messages or messages[-1]["role"] != "user":
                print(f"deltatalk: step {i}: nothing to regenerate or edit yet", file=sys.stderr)
                return 2
            if "edit" in step:
                messages[-1] = {"role": "user", "content": step["edit"]}
            label = step.get("edit", "(regenerate)")
        if not args.json:
            print(f"\n» {label}", file=sys.stderr)
        ids, pieces, last = [], [], None
        for r in session.reply(messages, settings, max_tokens=step.get("max_tokens", args.max_tokens)):
            ids.append(r.token)
            pieces.append(r.text)
            last = r
            if not args.json and r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
        text = "".join(pieces)
        messages.append({"role": "assistant", "content": text})
        st, stats = session.last_turn, session.stats()
        row = {
            "step": i, "kind": next(k for k in ("user", "regenerate", "edit") if k in step), "mode": st.mode,
            "prompt_tokens": st.prompt_tokens, "reused_tokens": st.reused_tokens,
            "prefilled_tokens": st.prefilled_tokens, "dropped_messages": st.dropped_messages,
            "restored_from": st.restored_from,
            "ttft_s": last.ttft_s if last else 0.0, "prompt_tps": last.prompt_tps if last else 0.0,
            "decode_tps": last.decode_tps if last else 0.0, "generated_token_ids": ids, "text": text,
            "stop_reason": last.finish_reason if last else None, "state_bytes": stats["state_bytes"],
            "kv_bytes": stats["kv_bytes"], "checkpoint_bytes": stats["checkpoint_bytes"],
        }
        if args.json:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            dropped = f", dropped {st.dropped_messages} old messages" if st.dropped_messages else ""
            print(f"\n[{st.mode}: reused {st.reused_tokens} of {st.prompt_tokens} prompt tokens, prefilled "
                  f"{st.prefilled_tokens}{dropped} | ttft {row['ttft_s'] * 1000:.0f} ms | "
                  f"{row['decode_tps']:.1f} tok/s | state {stats['state_bytes'] / 1e6:.2f} MB, "
                  f"KV {stats['kv_bytes'] / 1e6:.2f} MB, checkpoints {stats['checkpoint_bytes'] / 1e6:.2f} MB]",
                  file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    import numpy as np

    from engine import runtime
    from engine.session import ChatSession

    settings = _sampling(args)
    loaded, _ = open_model(args, quiet=args.json)
    if args.script is not None:
        return cmd_script(args, loaded, settings)
    session = ChatSession(loaded)
    tok = loaded.tokenizer
    if args.prompt_ids is not None:
        try:
            prompt = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
        except ValueError:
            print("deltatalk: --prompt-ids takes comma-separated integers", file=sys.stderr)
            return 2
        bad = [i for i in prompt if not 0 <= i < loaded.model.n_vocab]
        if bad or not prompt:
            print(f"deltatalk: token ids must be in 0..{loaded.model.n_vocab - 1}", file=sys.stderr)
            return 2
    elif args.raw:
        prompt = tok.encode(args.prompt, add_special=True, parse_special=True)
    else:
        prompt = session.render(_messages(args.system, args.prompt))

    logits_rows = []
    generated, pieces = [], []
    last = None
    for r in session.generate(prompt, settings, max_tokens=args.max_tokens, keep_logits=args.logits_out is not None):
        generated.append(r.token)
        pieces.append(r.text)
        if args.logits_out is not None:
            logits_rows.append(np.asarray(r.logits, dtype=np.float32))
        if not args.json and r.text:
            sys.stdout.write(r.text)
            sys.stdout.flush()
        last = r
    if args.logits_out is not None:
        np.save(args.logits_out, np.stack(logits_rows) if logits_rows else np.zeros((0, loaded.model.n_vocab), np.float32))
    result = {
        "model": str(loaded.path),
        "prompt_token_ids": list(map(int, prompt)),
        "generated_token_ids": list(map(int, generated)),
        "text": "".join(pieces),
        "stop_reason": last.finish_reason if last else "cancelled",
        "prompt_tokens": len(prompt),
        "prompt_tps": last.prompt_tps if last else 0.0,
        "ttft_s": last.ttft_s if last else 0.0,
        "generated_tokens": len(generated),
        "decode_tps": last.decode_tps if last else 0.0,
        "peak_rss_bytes": runtime.peak_rss_bytes(),
        "threads": runtime.set_threads(args.threads),
    }
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{result['prompt_tokens']} prompt tokens, {result['prompt_tps']:.1f} tok/s prefill, "
              f"ttft {result['ttft_s'] * 1000:.0f} ms | {result['generated_tokens']} tokens, "
              f"{result['decode_tps']:.1f} tok/s decode | stop: {result['stop_reason']}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """The full-screen chat (Textual); `--plain` gives the line-based chat below."""
    if args.endpoint:
        from chatapp.remote_cli import cmd_chat_remote

        return cmd_chat_remote(args)
    if not args.plain:
        from chatapp.app import run_tui

        return run_tui(model=Path(args.model).expanduser() if args.model else None, threads=args.threads,
                       ctx=args.ctx, system=args.system)
    return cmd_chat_plain(args)


def cmd_chat_plain(args) -> int:
    """A line-based chat in the terminal. Ctrl+C stops a reply; Ctrl+D or /exit quits."""
    from engine.session import ChatSession

    settings = _sampling(args)
    loaded, _ = open_model(args)
    session = ChatSession(loaded)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    name = loaded.path.name
    print(f"deltatalk — {name} ({loaded.arch}, ctx {loaded.model.n_ctx}). "
          "Enter sends; Ctrl+C stops a reply; /new clears; /exit or Ctrl+D quits.", file=sys.stderr)
    while True:
        try:
            user = input("\n› ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not user:
            continue
        if user in ("/exit", "/quit"):
            return 0
        if user == "/new":
            messages = messages[:1] if args.system else []
            print("(new chat)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": user})
        try:
            prompt = session.render(messages)
        except DeltatalkError as e:
            messages.pop()
            print(f"deltatalk: {e}", file=sys.stderr)
            continue
        cancel = threading.Event()
        reply, last = [], None
        try:
            for r in session.generate(prompt, settings, max_tokens=args.max_tokens, cancel=cancel):
                reply.append(r.text)
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last = r
        except KeyboardInterrupt:
            cancel.set()
            reply.append(" [stopped]")
        except DeltatalkError as e:
            messages.pop()
            print(f"\ndeltatalk: {e}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
        if last:
            st = session.last_turn
            print(f"\n[{last.decode_tps:.1f} tok/s · ttft {last.ttft_s * 1000:.0f} ms · reused "
                  f"{st.reused_tokens} of {st.prompt_tokens} prompt tokens]", file=sys.stderr)


def cmd_models(args) -> int:
    from chatapp.paths import models_dir

    rows = []
    d = models_dir()
    for p in sorted(d.glob("**/*.gguf")) if d.exists() else []:
        rows.append({"path": str(p), "size_bytes": p.stat().st_size})
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no GGUF files in {d} (run `deltatalk fetch` for the default model)")
    else:
        for r in rows:
            print(f"{r['size_bytes'] / 1e6:9.1f} MB  {r['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
