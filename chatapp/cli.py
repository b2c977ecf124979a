"""The `deltatalk` command: chat, run, bench, models, fetch, serve."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
from pathlib import Path

from chatapp import arg_types as A
from chatapp.errors import log_exception, one_line, setup_logging
from chatapp.model_args import make_speculator_from_args, open_model
from engine.errors import DeltatalkError

# The model used when -m is not given.
DEFAULT_MAX_TOKENS = 512


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), naming where to find the options."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_common_args(p: argparse.ArgumentParser):
    p.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")


def _add_model_args(p: argparse.ArgumentParser):
    # checked in _dispatch: with --endpoint, -m names the server's model, not a file
    p.add_argument("-m", "--model", type=A.text,
                   help="path to a .gguf file (default: the default model, fetched if missing); "
                        "with --endpoint, the server's model name")
    p.add_argument("--threads", type=A.int_in(1, A.MAX_THREADS), default=None,
                   help="compute threads, fixed (default: the physical cores, fewer while other programs "
                        "keep the CPU busy)")
    p.add_argument("--ctx", type=A.context_size, default=None,
                   help="context size in tokens, 16 up to the model's training context (default: min(model, 8192))")


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--temp", type=A.float_in(0.0, math.inf), default=0.7, help="temperature >= 0; 0 = greedy")
    p.add_argument("--top-k", type=A.int_in(0), default=40, help="keep the k likeliest tokens (>= 0; 0 = off)")
    p.add_argument("--top-p", type=A.float_in(0.0, 1.0, low_open=True), default=0.95, help="nucleus, in (0, 1]")
    p.add_argument("--min-p", type=A.float_in(0.0, 1.0, high_open=True), default=0.05, help="in [0, 1)")
    p.add_argument("--repeat-penalty", type=A.float_in(0.0, math.inf, low_open=True), default=1.0,
                   help="> 0; 1 = off")
    p.add_argument("--repeat-last-n", type=A.int_in(0), default=64, help=">= 0 tokens")
    p.add_argument("--seed", type=A.int_in(0, (1 << 63) - 1), default=None, help="0 .. 2^63-1")
    p.add_argument("--max-tokens", type=A.int_in(1, A.MAX_TOKENS_LIMIT), default=DEFAULT_MAX_TOKENS,
                   help="at most this many tokens in a reply (>= 1)")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="deltatalk", description="Private terminal chat for local GGUF models.")
    _add_common_args(ap)
    sub = ap.add_subparsers(dest="command")

    chat = sub.add_parser("chat", help="chat in the terminal (the default command)")
    _add_common_args(chat)
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", type=A.text, default=None, help="system prompt")
    chat.add_argument("--plain", action="store_true", help="a line-based chat instead of the full-screen app")

    run = sub.add_parser("run", help="answer one prompt on stdout")
    _add_common_args(run)
    _add_speculate_args(run)
    _add_model_args(run)
    _add_sampling_args(run)
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", type=A.text, help="the user message")
    src.add_argument("--prompt-ids", type=A.token_ids, help="comma-separated token ids fed as-is")
    src.add_argument("--script", type=A.existing_file("script file"),
                     help='replay a conversation: {"system": "...", "steps": [{"user": "..."}, '
                          '{"regenerate": true}, {"edit": "..."}]}; each step may set "max_tokens"')
    run.add_argument("--system", type=A.text, default=None, help="system prompt")
    run.add_argument("--raw", action="store_true", help="feed the prompt text as-is: no chat template")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    run.add_argument("--logits-out", type=A.output_file,
                     help="save float32 logits of every generated position (.npy); its folder must exist")

    bench = sub.add_parser("bench", help="prefill and decode speed (medians of interleaved runs)")
    _add_common_args(bench)
    _add_model_args(bench)
    _add_speculate_args(bench)
    bench.add_argument("--pp", type=A.int_list(1, A.MAX_TOKENS_LIMIT), default=[128, 512],
                       help="prompt lengths to time (comma-separated integers >= 1)")
    bench.add_argument("--tg", type=A.int_in(1, A.MAX_TOKENS_LIMIT), default=128, help="tokens to decode (>= 1)")
    bench.add_argument("--repeats", type=A.int_in(1, 1000), default=5, help="runs per test, 1..1000")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--peer", action="store_true",
                       help="also run llama.cpp (llama-cpp-python) on the same file, interleaved, with ratios")
    bench.add_argument("--busy", type=A.int_in(0, 64), default=0, metavar="N",
                       help="also run everything with N CPU-bound processes in their own sessions, side by side")
    bench.add_argument("--peer-python", default=None, type=A.existing_file("Python executable"),
                       help="a Python that has llama-cpp-python (default: this one; see the `peer` extra)")

    _add_common_args(sub.add_parser("fetch", help="download the default model (if missing) and exit"))
    models = sub.add_parser("models", help="list the GGUF files found")
    _add_common_args(models)
    models.add_argument("--json", action="store_true")
    from chatapp.remote_cli import add_endpoint_args
    from chatapp.server.cli import add_serve_parser

    add_endpoint_args(chat)
    add_endpoint_args(run)
    add_serve_parser(sub)
    return ap


COMMANDS = ("chat", "run", "bench", "fetch", "models", "serve")

# Exit codes: a usage error (a value out of range, a bad script) is 2, as argparse's own; a
# failure while running (a bad model file, out of memory, a download) is 1; Ctrl+C is 130.
EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 2, 1, 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # `deltatalk [-m FILE ...]` is `deltatalk chat [-m FILE ...]` (--debug may come first)
    first = next((a for a in argv if a != "--debug"), None)
    if first is None or (first not in COMMANDS and first not in ("-h", "--help")):
        argv = ["chat"] + [a for a in argv if a != "--debug"] + (["--debug"] if debug else [])
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as e:  # noqa: BLE001  (the last line of defence: one line, never a traceback)
        if debug:
            raise
        return _report(e)


def _report(e: BaseException) -> int:
    """Print one line for an error that reached main(); return the exit code."""
    from engine.errors import InvalidSettingError, PromptError

    if isinstance(e, BrokenPipeError):  # `deltatalk run ... | head`: the reader left
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives until exit)
        except OSError:
            pass
        return EXIT_RUNTIME
    if isinstance(e, DeltatalkError):
        print(f"deltatalk: {one_line(str(e), 400)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (InvalidSettingError, PromptError)) else EXIT_RUNTIME
    if isinstance(e, MemoryError):
        print("deltatalk: out of memory: try a smaller model or a smaller --ctx", file=sys.stderr)
        return EXIT_RUNTIME
    if isinstance(e, OSError):
        print(f"deltatalk: {one_line(str(e), 400)}", file=sys.stderr)
        return EXIT_RUNTIME
    where = ""
    try:
        log_exception(e, "deltatalk command")
        where = f"; details in {setup_logging()}"
    except Exception:  # noqa: BLE001  (logging must not turn one line into a traceback)
        pass
    print(f"deltatalk: internal error: {one_line(f'{type(e).__name__}: {e}', 300)} "
          f"(run with --debug for the traceback{where})", file=sys.stderr)
    return EXIT_RUNTIME


def _dispatch(args) -> int:
    cmd = args.command
    if cmd in ("chat", "run", "bench") and args.model is not None and not getattr(args, "endpoint", None):
        try:
            args.model = A.existing_file("model file")(args.model)
        except argparse.ArgumentTypeError as e:
            print(f"deltatalk {cmd}: argument -m/--model: {e} (see deltatalk {cmd} --help)", file=sys.stderr)
            return EXIT_USAGE
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


def _sampling(args):
    from engine.sampling import SamplingSettings

    return SamplingSettings(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                            seed=args.seed).validate()


def _messages(system: str | None, user: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


MAX_SCRIPT_BYTES = 16 << 20  # a conversation script; more is a mistake, not a script


def load_script(path: Path) -> dict:
    """Read and check a conversation script; raise ValueError with what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SCRIPT_BYTES + 1)
        if len(raw) > MAX_SCRIPT_BYTES:
            raise ValueError(f"{path}: larger than {MAX_SCRIPT_BYTES >> 20} MB")
        script = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except (OSError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(script, dict) or not isinstance(script.get("steps"), list) or not script["steps"]:
        raise ValueError(f'{path}: expected {{"system": "...", "steps": [...]}} with at least one step')
    if not isinstance(script.get("system", ""), str):
        raise ValueError(f"{path}: system must be a string")
    _check_utf8(path, "system", script.get("system", ""))
    for i, step in enumerate(script["steps"]):
        kinds = [k for k in ("user", "regenerate", "edit") if k in step] if isinstance(step, dict) else []
        if len(kinds) != 1:
            raise ValueError(f'{path}: step {i} must have exactly one of "user", "regenerate", "edit"')
        if kinds[0] in ("user", "edit"):
            if not isinstance(step[kinds[0]], str):
                raise ValueError(f"{path}: step {i}: {kinds[0]} must be a string")
            _check_utf8(path, f"step {i}: {kinds[0]}", step[kinds[0]])
        mt = step.get("max_tokens", 1)
        if isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= A.MAX_TOKENS_LIMIT:
            raise ValueError(f"{path}: step {i}: max_tokens must be an integer in 1..{A.MAX_TOKENS_LIMIT}")
    return script


def _check_utf8(path: Path, where: str, text: str):
    """JSON's \\ud800 escapes make lone surrogates: text no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{path}: {where}: a lone surrogate at character {e.start} is not valid text") from None


def cmd_script(args, loaded, settings, script: dict) -> int:
    """Replay a checked script (load_script) through one ChatSession; report each step."""
    from engine.session import ChatSession

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


def _add_speculate_args(p):
    from engine.speculative import DEFAULT_DRAFT_MAX, MODES

    p.add_argument("--speculate", choices=MODES, default="off",
                   help="speculative decoding (same tokens, faster): lookup = n-grams of the conversation, "
                        "draft = a small model (--draft), mtp = the model's own MTP head")
    p.add_argument("--draft", default=None, help="draft model .gguf for --speculate draft (same vocabulary)")
    p.add_argument("--draft-max", type=int, default=DEFAULT_DRAFT_MAX,
                   help=f"most tokens drafted per step (adaptive below it; default {DEFAULT_DRAFT_MAX})")


def cmd_run(args) -> int:
    import numpy as np

    from engine import runtime
    from engine.session import ChatSession

    settings = _sampling(args)
    if args.script is not None:
        try:  # checked before the model is loaded: a usage error costs nothing
            script = load_script(args.script)
        except ValueError as e:
            print(f"deltatalk: {e}", file=sys.stderr)
            return 2
    loaded, _ = open_model(args, quiet=args.json)
    if args.script is not None:
        return cmd_script(args, loaded, settings, script)
    session = ChatSession(loaded)
    session.speculator = make_speculator_from_args(args, loaded)
    tok = loaded.tokenizer
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
        if any(i >= loaded.model.n_vocab for i in prompt):
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
        "threads": runtime.threads_in_use()["threads"],
        "thread_policy": runtime.threads_in_use(),   # count, maximum, policy, decode steps per count
    }
    if session.speculator is not None:
        result["speculation"] = dict(mode=args.speculate, **session.speculator.stats.to_dict())
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{result['prompt_tokens']} prompt tokens, {result['prompt_tps']:.1f} tok/s prefill, "
              f"ttft {result['ttft_s'] * 1000:.0f} ms | {result['generated_tokens']} tokens, "
              f"{result['decode_tps']:.1f} tok/s decode | stop: {result['stop_reason']}]", file=sys.stderr)
        if "speculation" in result:
            sp = result["speculation"]
            print(f"[speculate {sp['mode']}: {sp['accepted']}/{sp['drafted']} drafted tokens accepted "
                  f"({100 * sp['acceptance']:.0f}%), {sp['tokens_per_step']:.2f} tokens per step]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """The full-screen chat (Textual); `--plain` gives the line-based chat below."""
    if args.endpoint:
        from chatapp.remote_cli import cmd_chat_remote

        return cmd_chat_remote(args)
    if not args.plain:
        from chatapp.app import run_tui

        return run_tui(model=args.model, threads=args.threads,
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
    from chatapp.models_cli import cmd_models as list_models

    return list_models(args)


if __name__ == "__main__":
    sys.exit(main())
