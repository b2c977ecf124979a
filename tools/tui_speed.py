"""Does the TUI pace the engine? Decode tok/s of the same greedy reply in `deltatalk run --json`
and inside the chat app (headless, driven by Pilot), in interleaved pairs.

    PYTHONPATH=. python tools/tui_speed.py [-m model.gguf] [--pairs 5] [--max-tokens 128]

Each measurement is a fresh process (same conditions: model load, JIT cache). The TUI run
types the question, presses Enter and reads the decode speed the engine reported to the
gauge when the reply finished; the app's home is a temp dir (no real chats are touched).
Prints each pair, then the median decode tok/s of each and their ratio (target: >= 0.95).
Not a test: run it on a quiet machine.

    PYTHONPATH=. python tools/tui_speed.py --esc [--busy 1] [--pairs 5]

measures instead how long Esc takes to stop a reply in the TUI (from the key press to the
reply marked stopped, target <= 0.5 s), optionally with N CPU-bound processes running in their
own sessions (as `deltatalk bench --busy N`): the Esc comes mid-decode, after 20 tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def run_cli(model: str, max_tokens: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "chatapp.cli", "run", "--json", "-m", model, "--temp", "0",
           "--max-tokens", str(max_tokens), "-p", PROMPT]
    if threads:
        cmd[4:4] = ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"decode_tps": r["decode_tps"], "generated": r["generated_tokens"], "text": r["text"]}


def run_tui(model: str, max_tokens: int, threads: int | None, ui_share: float | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-tui", "-m", model,
           "--max-tokens", str(max_tokens)] + (["--threads", str(threads)] if threads else [])
    if ui_share:
        cmd += ["--ui-share", str(ui_share)]
    return _child(cmd)


def _child(cmd: list[str]) -> dict:
    """Run a child TUI measurement with a throw-away home; its last stdout line (JSON)."""
    with tempfile.TemporaryDirectory(prefix="tui-speed-") as home:
        env = _env()
        env["DELTATALK_HOME"] = home
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise SystemExit(f"TUI run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _headless_app(model: str, max_tokens: int, threads: int | None):
    """The chat app on `model`, greedy, with no model discovery (run it with app.run_test)."""
    from chatapp.app import DeltatalkApp
    from chatapp.config import Config
    from chatapp.engine_backend import EngineBackend

    config = Config.load()
    config.overrides["max_tokens"] = max_tokens
    config.overrides["sampling"] = {"temperature": 0.0}
    backend = EngineBackend(threads=threads)
    return DeltatalkApp(backend, model_path=Path(model), config=config, find_models=lambda: [],
                        offer_fetch=False), backend


async def _ask(app, backend, pilot) -> None:
    """Wait for the model, type the prompt and press Enter."""
    while backend.info is None or app.loading is not None:
        if any(n.severity == "error" for n in app._notifications):
            raise SystemExit("the model did not load: " + "; ".join(n.message for n in app._notifications))
        await pilot.pause(0.05)
    app.chat_input.text = PROMPT
    app.chat_input.focus()
    await pilot.press("enter")


async def _tui(model: str, max_tokens: int, threads: int | None, ui_share: float | None = None) -> dict:
    import chatapp.reply_stream as reply_stream

    if ui_share:
        reply_stream.UI_SHARE_TARGET = ui_share
    app, backend = _headless_app(model, max_tokens, threads)
    async with app.run_test(size=(120, 36)) as pilot:
        await _ask(app, backend, pilot)
        while not app.turns:
            # asyncio.sleep, not pilot.pause: a pilot pause waits on every widget and forces a
            # full screen refresh, UI work a real session does not do (it cost ~0.05 of the ratio)
            await asyncio.sleep(0.05)
        turn = app.turns[-1]
        text = app.store.messages(app.chat.id)[-1].content
    return {"decode_tps": turn.decode_tps, "generated": turn.generated, "text": text}


async def _tui_esc(model: str, threads: int | None, after_tokens: int = 20) -> dict:
    """Seconds from Esc (mid-decode) to the reply marked stopped, in a headless app."""
    app, backend = _headless_app(model, 4096, threads)
    async with app.run_test(size=(120, 36)) as pilot:
        await _ask(app, backend, pilot)
        while not app.chat_view.generating:
            await asyncio.sleep(0.01)   # (not pilot.pause: see _tui)
        while app.gauge.turn.generated < after_tokens:   # the streamed count the gauge shows
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await pilot.press("escape")
        while app.chat_view.generating:
            await asyncio.sleep(0.005)
        stopped = time.perf_counter() - t0
        turn = app.turns[-1]
    return {"stop_s": stopped, "generated": turn.generated, "outcome": turn.finish}


def esc_main(args) -> int:
    from engine.bench import busy_processes

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-esc", "-m", args.model] + (
        ["--threads", str(args.threads)] if args.threads else [])
    times = []
    with busy_processes(args.busy):
        for i in range(args.pairs):
            r = _child(cmd)
            times.append(r["stop_s"])
            print(f"try {i + 1}: Esc stopped the reply in {r['stop_s'] * 1000:.0f} ms "
                  f"({r['generated']} tokens, {r['outcome']})", flush=True)
    worst, med = max(times), statistics.median(times)
    print(f"{args.busy} busy process(es): Esc to stopped, median {med * 1000:.0f} ms, worst {worst * 1000:.0f} ms "
          f"({'within' if worst <= 0.5 else 'NOT within'} 0.5 s)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ui-share", type=float, default=None,
                    help="experiment: override chatapp.reply_stream.UI_SHARE_TARGET in the TUI runs")
    ap.add_argument("--esc", action="store_true", help="measure Esc-to-stopped instead of decode speed")
    ap.add_argument("--busy", type=int, default=0, help="with --esc: N CPU-bound processes meanwhile")
    ap.add_argument("--child-tui", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-esc", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        from chatapp.default_model import ensure_default_model

        args.model = str(ensure_default_model(say=lambda s: None))
    if args.child_esc:
        print(json.dumps(asyncio.run(_tui_esc(args.model, args.threads))))
        return 0
    if args.esc:
        return esc_main(args)
    if args.child_tui:
        print(json.dumps(asyncio.run(_tui(args.model, args.max_tokens, args.threads, args.ui_share))))
        return 0
    cli, tui = [], []
    print(f"model {args.model}, greedy, max {args.max_tokens} tokens, {args.pairs} interleaved pairs")
    for i in range(args.pairs):
        t0 = time.perf_counter()
        a = run_cli(args.model, args.max_tokens, args.threads)
        b = run_tui(args.model, args.max_tokens, args.threads, args.ui_share)
        same = "same text" if a["text"].strip() == b["text"].strip() else "TEXT DIFFERS"
        print(f"pair {i + 1}: run {a['decode_tps']:6.1f} tok/s ({a['generated']} tokens) | "
              f"tui {b['decode_tps']:6.1f} tok/s ({b['generated']} tokens) | {same} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        cli.append(a["decode_tps"])
        tui.append(b["decode_tps"])
    mc, mt = statistics.median(cli), statistics.median(tui)
    # the machine's speed drifts between pairs: the median of the per-pair ratios is the figure
    ratio = statistics.median(b / a for a, b in zip(cli, tui) if a)
    print(f"median decode: run {mc:.1f} tok/s, tui {mt:.1f} tok/s; median of pair ratios tui/run = "
          f"{ratio:.3f} ({'within' if ratio >= 0.95 else 'NOT within'} 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
