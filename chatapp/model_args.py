"""The model a command line names: its path (the default model fetched if none), loaded and
warmed with the command's threads and context, and its speculator.

Shared by the subcommands (chat, run, bench, serve), so none imports another's module.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from engine.errors import DeltatalkError


def resolve_model(path: Path | None) -> Path:
    if path:
        return path
    from chatapp.default_model import ensure_default_model

    return ensure_default_model(say=lambda s: print(s, file=sys.stderr))


def open_model(args, quiet: bool = False):
    """Load the model named by the args, set threads, and compile/warm the kernels visibly."""
    from engine import runtime
    from engine.loader import load_model
    from engine.warmup import warm_up

    runtime.set_threads(args.threads)
    path = resolve_model(args.model)
    loaded = load_model(path, n_ctx=args.ctx, within_training_context=True)
    loaded.template.on_fallback = lambda notice: print(f"deltatalk: {notice}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    warm_up(loaded.model, say=None if quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    return loaded, time.perf_counter() - t


def make_speculator_from_args(args, loaded):
    """The Speculator for --speculate/--draft/--draft-max (None when off); errors are DeltatalkError."""
    from engine.loader import load_model
    from engine.speculative import make_speculator

    if args.draft_max < 1:
        raise DeltatalkError(f"--draft-max must be >= 1, got {args.draft_max}")
    draft = None
    if args.speculate == "draft" and args.draft:
        draft = load_model(Path(args.draft).expanduser(), n_ctx=loaded.model.n_ctx)
    return make_speculator(args.speculate, loaded, draft, args.draft_max)
