"""The `deltatalk` command: parse the arguments and dispatch to the command modules
(chat_cli, run_cli, bench_cli, models_cli, remote_cli, server.cli); errors become one line."""

from __future__ import annotations

import argparse
import os
import sys

from chatapp import arg_types as A
from chatapp.cli_common import add_common_args, add_model_args, add_sampling_args, add_speculate_args
from chatapp.errors import log_exception, one_line, setup_logging
from engine.errors import DeltatalkError


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), naming where to find the options."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="deltatalk", description="Private terminal chat for local GGUF models.")
    add_common_args(ap)
    sub = ap.add_subparsers(dest="command")

    chat = sub.add_parser("chat", help="chat in the terminal (the default command)")
    add_common_args(chat)
    add_model_args(chat)
    add_sampling_args(chat, config_decides=True)   # the app: flags not given leave the config's values
    chat.add_argument("--system", type=A.text, default=None, help="system prompt")
    chat.add_argument("--plain", action="store_true", help="a line-based chat instead of the full-screen app")

    run = sub.add_parser("run", help="answer one prompt on stdout")
    add_common_args(run)
    add_speculate_args(run)
    add_model_args(run)
    add_sampling_args(run)
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
    add_common_args(bench)
    add_model_args(bench)
    add_speculate_args(bench)
    bench.add_argument("--pp", type=A.int_list(1, A.MAX_TOKENS_LIMIT), default=[128, 512],
                       help="prompt lengths to time (comma-separated integers >= 1)")
    bench.add_argument("--tg", type=A.int_in(1, A.MAX_TOKENS_LIMIT), default=128, help="tokens to decode (>= 1)")
    bench.add_argument("--depth", type=A.int_in(0, A.MAX_TOKENS_LIMIT), default=0, metavar="N",
                       help="prefill and decode after N tokens already in the context, as deep in a chat "
                            "(ppN@dN, tgN@dN; default 0)")
    bench.add_argument("--repeats", type=A.int_in(1, 1000), default=5, help="runs per test, 1..1000")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--peer", action="store_true",
                       help="also run llama.cpp (llama-cpp-python) on the same file, interleaved, with ratios")
    bench.add_argument("--busy", type=A.int_in(0, 64), default=0, metavar="N",
                       help="also run everything with N CPU-bound processes in their own sessions, side by side")
    bench.add_argument("--peer-python", default=None, type=A.existing_file("Python executable"),
                       help="a Python that has llama-cpp-python (default: this one; see the `peer` extra)")

    add_common_args(sub.add_parser("fetch", help="download the default model (if missing) and exit"))
    models = sub.add_parser("models", help="list the GGUF files found")
    add_common_args(models)
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
        from chatapp.run_cli import cmd_run

        return cmd_run(args)
    if cmd == "bench":
        from chatapp.bench_cli import cmd_bench

        return cmd_bench(args)
    from chatapp.chat_cli import cmd_chat

    return cmd_chat(args)


def cmd_models(args) -> int:
    from chatapp.models_cli import cmd_models as list_models

    return list_models(args)


if __name__ == "__main__":
    sys.exit(main())
