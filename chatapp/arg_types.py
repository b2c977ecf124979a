"""argparse `type=` functions: each checks one kind of command-line value and says its range.

A bad value becomes argparse's usage error (one line, exit 2) before anything is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

MAX_TOKENS_LIMIT = 1 << 20  # no context holds more; a typo like 10**12 is refused, not clamped
MAX_THREADS = 1024


def _fail(msg: str) -> NoReturn:
    raise argparse.ArgumentTypeError(msg)


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval; the message names the interval."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if math.isinf(high):
        span = f"{'(' if low_open else '['}{low:g}, inf)"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            _fail(f"{text!r} is not a number (allowed: {span})")
        if not math.isfinite(v) or v < low or v > high or (low_open and v == low) or (high_open and v == high):
            _fail(f"{text} is out of range (allowed: {span})")
        return v

    parse.__name__ = "number"
    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high]; the message names the range."""
    span = f"{low}..{high}" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            _fail(f"{text!r} is not an integer (allowed: {span})")
        if v < low or (high is not None and v > high):
            _fail(f"{text} is out of range (allowed: {span})")
        return v

    parse.__name__ = "integer"
    return parse


def int_list(low: int, high: int) -> Callable[[str], list[int]]:
    """Comma-separated integers, each in [low, high], at least one."""
    item = int_in(low, high)

    def parse(text: str) -> list[int]:
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if not parts:
            _fail(f"{text!r}: expected comma-separated integers in {low}..{high}")
        return [item(p) for p in parts]

    parse.__name__ = "list of integers"
    return parse


def context_size(text: str) -> int:
    from engine.loader import MAX_CTX, MIN_CTX  # also checked against the model's own limit at load

    return int_in(MIN_CTX, MAX_CTX)(text)


context_size.__name__ = "context size"


def text(value: str) -> str:
    """Text given on the command line: must be valid UTF-8 (Python keeps bad bytes as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        _fail(f"is not valid UTF-8 text (byte {e.start}); give the text as UTF-8")
    return value


text.__name__ = "text"


def _stat_or_fail(value: str, what: str) -> os.stat_result:
    if not value:
        _fail(f"an empty path is not a {what}")
    try:
        return os.stat(Path(value).expanduser())
    except FileNotFoundError:
        _fail(f"{value}: no such file")
    except OSError as e:  # a symlink loop, a too-long name, no permission
        _fail(f"{value}: {e.strerror}")


def existing_file(what: str = "file") -> Callable[[str], Path]:
    """A path to an existing regular file: not a folder, FIFO or device (opening a FIFO blocks)."""

    def parse(value: str) -> Path:
        st = _stat_or_fail(value, what)
        if stat.S_ISDIR(st.st_mode):
            _fail(f"{value} is a folder, not a {what}")
        if not stat.S_ISREG(st.st_mode):
            _fail(f"{value} is not a regular file (a pipe or device?), not a {what}")
        return Path(value).expanduser()

    parse.__name__ = what
    return parse


def output_file(value: str) -> Path:
    """A file to be written later: its folder must exist and be writable now, before any work."""
    if not value:
        _fail("an empty path is not a file name")
    p = Path(value).expanduser()
    parent = p.parent
    if not parent.is_dir():
        _fail(f"{value}: folder {parent} does not exist")
    if p.is_dir():
        _fail(f"{value} is a folder, not a file name")
    if not os.access(parent, os.W_OK):
        _fail(f"{value}: folder {parent} is not writable")
    return p


output_file.__name__ = "output file"


def token_ids(value: str) -> list[int]:
    """Comma-separated token ids (checked against the vocabulary once the model is loaded)."""
    return int_list(0, (1 << 31) - 1)(value)


token_ids.__name__ = "token ids"
