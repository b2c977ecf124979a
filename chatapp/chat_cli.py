"""`deltatalk chat`: the full-screen app (Textual), or with `--plain` a line-based chat.

The plain chat goes through `ChatSession.reply()` as the app does: the session works out what
is new in the conversation (append / regenerate / edit), drops the oldest turns when the
context is full, and keeps a stopped reply as the assistant message, so the next turn reuses
the cache. Ctrl+C during a reply stops it (the partial reply is kept); at the prompt it quits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from chatapp.cli_common import given_sampling, max_tokens_from_args, open_model, sampling_from_args
from engine.errors import DeltatalkError


def cmd_chat(args: argparse.Namespace) -> int:
    """The full-screen chat (Textual); `--plain` gives the line-based chat below."""
    if args.endpoint:
        from chatapp.remote_cli import cmd_chat_remote

        return cmd_chat_remote(args)
    if not args.plain:
        from chatapp.app import run_tui

        return run_tui(model=args.model, threads=args.threads, ctx=args.ctx, system=args.system,
                       sampling=given_sampling(args), max_tokens=args.max_tokens)
    return cmd_chat_plain(args)


class _StopOnInterrupt:
    """While a reply streams, Ctrl+C sets `cancel` (the session then ends the reply cleanly)
    instead of raising KeyboardInterrupt through the generator."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.active = threading.current_thread() is threading.main_thread()   # signals reach only it
        self.previous = signal.getsignal(signal.SIGINT)

    def __enter__(self) -> _StopOnInterrupt:
        if self.active:
            self.previous = signal.signal(signal.SIGINT, lambda signum, frame: self.cancel.set())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def cmd_chat_plain(args: argparse.Namespace) -> int:
    """A line-based chat in the terminal. Ctrl+C stops a reply; Ctrl+D or /exit quits."""
    from engine.session import ChatSession

    settings = sampling_from_args(args)
    loaded, _ = open_model(args)
    session = ChatSession(loaded)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"deltatalk — {loaded.path.name} ({loaded.arch}, ctx {session.n_ctx}). "
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
        cancel = threading.Event()
        reply, last = [], None
        try:
            with _StopOnInterrupt(cancel):
                for r in session.reply(messages, settings, max_tokens=max_tokens_from_args(args), cancel=cancel):
                    reply.append(r.text)
                    sys.stdout.write(r.text)
                    sys.stdout.flush()
                    last = r
        except DeltatalkError as e:
            messages.pop()
            print(f"\ndeltatalk: {e}", file=sys.stderr)
            continue
        # exactly the text the session recorded, so the next turn is an append that reuses the cache
        messages.append({"role": "assistant", "content": "".join(reply)})
        if last:
            st = session.last_turn
            stopped = " · stopped" if last.finish_reason == "cancelled" else ""
            dropped = f" · dropped {st.dropped_messages} old messages" if st.dropped_messages else ""
            print(f"\n[{last.decode_tps:.1f} tok/s · ttft {last.ttft_s * 1000:.0f} ms · reused "
                  f"{st.reused_tokens} of {st.prompt_tokens} prompt tokens{dropped}{stopped}]", file=sys.stderr)
