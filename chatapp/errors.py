"""Errors for people: a one-line cause on screen, the details in the log file."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from chatapp.paths import log_dir
from engine.errors import ContextOverflowError, ModelFileError, TemplateError, UnsupportedQuantError

log = logging.getLogger("deltatalk")
_configured: Path | None = None


def setup_logging() -> Path:
    """Log to <log dir>/deltatalk.log (rotating); idempotent. Returns the file's path."""
    global _configured
    path = log_dir() / "deltatalk.log"
    if _configured == path:
        return path
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        h = logging.handlers.RotatingFileHandler(path, maxBytes=2_000_000, backupCount=2, encoding="utf-8")
    except OSError:
        h = logging.NullHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    _configured = path
    return path


def one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def describe_error(exc: BaseException, doing: str = "") -> str:
    """The one-line cause shown in a notification."""
    prefix = f"{doing}: " if doing else ""
    if isinstance(exc, MemoryError):
        return one_line(f"{prefix}out of memory — try a smaller model or a shorter context")
    if isinstance(exc, ModelFileError):
        name = Path(exc.path).name if exc.path else ""
        msg = f"{name}: {exc.problem}" if name else exc.problem
        if exc.supported:
            msg += f" (supported: {exc.supported})"
        return one_line(prefix + msg)
    if isinstance(exc, TemplateError):
        return one_line(f"{prefix}chat template error: {exc}")
    if isinstance(exc, ContextOverflowError):
        return one_line(f"{prefix}the chat is longer than the context: {exc} — start a new chat")
    if isinstance(exc, UnsupportedQuantError):
        return one_line(f"{prefix}{exc}")
    text = str(exc) or type(exc).__name__
    return one_line(f"{prefix}{type(exc).__name__}: {text}")


def log_exception(exc: BaseException, doing: str = ""):
    log.error("%s", doing or "error", exc_info=(type(exc), exc, exc.__traceback__))
