"""What the `deltatalk` commands share: the model, sampling and speculation arguments, and
opening the model they name. Imported by every command module (`chatapp.cli` only parses and
dispatches), so no command module imports another."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from chatapp import arg_types as A
from chatapp.generation_defaults import GENERATION_DEFAULTS
from engine.errors import DeltatalkError
from engine.sampling import SamplingSettings


def add_common_args(p: argparse.ArgumentParser):
    p.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")


def add_model_args(p: argparse.ArgumentParser):
    # checked in _dispatch: with --endpoint, -m names the server's model, not a file
    p.add_argument("-m", "--model", type=A.text,
                   help="path to a .gguf file (default: the default model, fetched if missing); "
                        "with --endpoint, the server's model name")
    p.add_argument("--threads", type=A.int_in(1, A.MAX_THREADS), default=None,
                   help="compute threads, fixed (default: the physical cores, fewer while other programs "
                        "keep the CPU busy)")
    p.add_argument("--ctx", type=A.context_size, default=None,
                   help="context size in tokens, 16 up to the model's training context (default: min(model, 8192))")


# flag (argparse dest) -> engine.sampling.SamplingSettings field
SAMPLING_FLAGS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "seed": "seed"}


def add_sampling_args(p: argparse.ArgumentParser, *, config_decides: bool = False):
    """The sampling flags, defaulting to chatapp.generation_defaults; with `config_decides` (the app)
    a flag not given stays None, so the config file's value is used (see given_sampling)."""
    values = GENERATION_DEFAULTS.sampling.to_dict()
    d = {flag: None if config_decides else values[field] for flag, field in SAMPLING_FLAGS.items()}
    max_tokens = GENERATION_DEFAULTS.max_tokens
    p.add_argument("--temp", type=A.float_in(0.0, math.inf), default=d["temp"], help="temperature >= 0; 0 = greedy")
    p.add_argument("--top-k", type=A.int_in(0), default=d["top_k"], help="keep the k likeliest tokens (>= 0; 0 = off)")
    p.add_argument("--top-p", type=A.float_in(0.0, 1.0, low_open=True), default=d["top_p"], help="nucleus, in (0, 1]")
    p.add_argument("--min-p", type=A.float_in(0.0, 1.0, high_open=True), default=d["min_p"], help="in [0, 1)")
    p.add_argument("--repeat-penalty", type=A.float_in(0.0, math.inf, low_open=True), default=d["repeat_penalty"],
                   help="> 0; 1 = off")
    p.add_argument("--repeat-last-n", type=A.int_in(0), default=d["repeat_last_n"], help=">= 0 tokens")
    p.add_argument("--seed", type=A.int_in(0, (1 << 63) - 1), default=d["seed"], help="0 .. 2^63-1")
    p.add_argument("--max-tokens", type=A.int_in(1, A.MAX_TOKENS_LIMIT), default=None if config_decides else max_tokens,
                   help=f"at most this many tokens in a reply (>= 1; default {max_tokens})")


def add_speculate_args(p):
    from engine.speculative import DEFAULT_DRAFT_MAX, MODES

    p.add_argument("--speculate", choices=MODES, default="off",
                   help="speculative decoding (same tokens, faster): lookup = n-grams of the conversation, "
                        "draft = a small model (--draft), mtp = the model's own MTP head")
    p.add_argument("--draft", default=None, help="draft model .gguf for --speculate draft (same vocabulary)")
    p.add_argument("--draft-max", type=int, default=DEFAULT_DRAFT_MAX,
                   help=f"most tokens drafted per step (adaptive below it; default {DEFAULT_DRAFT_MAX})")


def speculator_factory(args, loaded):
    """A function making a new Speculator for --speculate/--draft/--draft-max (None when off),
    one per conversation or run; the draft model is loaded once, here. The first one is made
    here too, so a pair that cannot work is refused now. Errors are DeltatalkError."""
    from engine.loader import load_model
    from engine.speculative import make_speculator

    if args.draft_max < 1:
        raise DeltatalkError(f"--draft-max must be >= 1, got {args.draft_max}")
    draft = None
    if args.speculate == "draft" and args.draft:
        draft = load_model(Path(args.draft).expanduser(), n_ctx=loaded.model.n_ctx)

    def make():
        return make_speculator(args.speculate, loaded, draft, args.draft_max)

    make()
    return make


def make_speculator_from_args(args, loaded):
    """The Speculator for --speculate/--draft/--draft-max (None when off); errors are DeltatalkError."""
    return speculator_factory(args, loaded)()


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


def given_sampling(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags given on the command line, as SamplingSettings fields."""
    given = vars(args)
    return {field: given[flag] for flag, field in SAMPLING_FLAGS.items() if given.get(flag) is not None}


def sampling_from_args(args: argparse.Namespace) -> SamplingSettings:
    """The validated SamplingSettings of the sampling flags (the defaults for those not given)."""
    return SamplingSettings(**{**GENERATION_DEFAULTS.sampling.to_dict(), **given_sampling(args)}).validate()


def max_tokens_from_args(args: argparse.Namespace) -> int:
    return args.max_tokens or GENERATION_DEFAULTS.max_tokens


def chat_messages(system: str | None, user: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]
