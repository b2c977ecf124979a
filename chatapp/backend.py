"""The TUI's view of an inference engine: the `ChatBackend` protocol and the figures it reports.

`ChatBackend` is everything the app needs: load a model (with progress), stream a
reply to a list of messages, and report figures for the gauge and the speed overlay.
Its implementations:

- `chatapp.engine_backend.EngineBackend` wraps `engine.loader.load_model`,
  `engine.session.ChatSession` and `engine.warmup.warm_up`; its figures come from
  `ChatSession.stats()` / `last_turn`.
- `chatapp.remote_backend.RemoteBackend` talks to an OpenAI-compatible server (deltatalk serve,
  vLLM, llama.cpp's server, Ollama); its figures are measured at the client.
- `tests.fakes.FakeBackend` is scripted and deterministic with frozen timings; the TUI
  tests use it, so they never load a real model or compile numba.

Everything is called from the app's thread workers, never from the UI thread, except
`info`, `last_turn()` and `session_stats()`, which are cheap reads.

Chat states: the session belongs to one chat at a time. `bind(key, state_path)` makes it
that chat's: kept if it already is, else restored from the chat's saved state (no prefill
needed), else reset. `load(..., bind=(key, state_path))` does the same for the new model's
session before it is switched to. `reply(..., save_to=path)` writes the session's state
there once the reply has finished (still in the worker thread, before the generator ends).

The prompt side of a reply is the engine's `engine.session.TurnStats`, for every backend.

Notices: `on_notice` (set by the app) receives one-line messages the user must see that are
not errors, from whatever thread found them: today, that the model's chat template went over
a render limit and the built-in format of its architecture is used instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from engine.generate import GenerationResponse
from engine.sampling import SamplingSettings

if TYPE_CHECKING:   # engine.session loads the model code (~0.4 s): the app imports it when a model is used
    from engine.loader import LoadedModel
    from engine.session import TurnStats

# progress(stage, fraction): stage is a short label ("open", "validate", "compile", ...);
# fraction in [0, 1], or None when the stage has no measurable progress.
LoadProgress = Callable[[str, "float | None"], None]
PrefillProgress = Callable[[int, int], None]
ChatKey = Hashable                  # the chat a session belongs to (the app uses the chat's id)
BindTo = tuple[ChatKey, "Path | None"]   # (chat key, its saved state file or None)

DEFAULT_BANDWIDTH_BYTES_S = 15e9   # used until the engine measures the machine's bandwidth

__all__ = ["BackendStats", "BindTo", "ChatBackend", "ChatKey", "LoadProgress", "ModelInfo",
           "ModelFigures", "PrefillProgress", "model_figures"]


@dataclass
class ModelInfo:
    """What the app shows about the loaded model."""

    path: Path
    name: str
    arch: str
    n_ctx: int
    file_size: int
    supports_thinking: bool = False
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    endpoint: str = ""            # the API base URL of a remote model (chatapp.remote), else ""
    warm_up_seconds: float = 0.0  # the first-reply warm-up (a short real reply, then a reset)
    base_model: bool = False      # no chat template in the file: a completion model, not a chat model


@dataclass
class BackendStats:
    """Figures for the speed overlay. Bytes are 0 when the engine does not have the thing."""

    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    model_bytes: int = 0
    kv_bytes: int = 0
    state_bytes: int = 0          # recurrent (DeltaNet) state
    checkpoint_bytes: int = 0
    threads: int = 1
    threads_max: int = 1
    threads_policy: str = ""          # "adaptive" (fewer threads while the CPU is busy) or "fixed"
    cpus: int = 0                     # logical CPUs the engine may run on (0: not known, or remote)
    threading_layer: str = "?"
    bandwidth_bytes_s: float = DEFAULT_BANDWIDTH_BYTES_S
    bandwidth_measured: bool = False
    weight_pages: str = ""        # where the weights are mapped ("weights on 2 MB pages: 100%"), when known
    context_used: int = 0
    n_ctx: int = 0
    checkpoints: int = 0
    cpu_features: list[str] = field(default_factory=list)
    kernel_family: str = ""
    remote: str = ""              # the endpoint URL when the model runs elsewhere (no local memory figures)


class ModelFigures(Protocol):
    """What chatapp reads from a loaded engine model; every architecture has these."""

    n_ctx: int
    weight_bytes: int


def model_figures(loaded: LoadedModel) -> ModelFigures:
    """`loaded.model` with the figures typed (the engine types LoadedModel.model as `object`)."""
    return cast(ModelFigures, loaded.model)


class ChatBackend(Protocol):
    info: ModelInfo | None
    on_notice: Callable[[str], None] | None   # set by the app; called from worker threads

    def load(self, path: Path, progress: LoadProgress | None = None,
             bind: BindTo | None = None) -> ModelInfo:
        """Open, validate and warm up a model; `bind=(key, state_path)` gives the new session to
        that chat (as `bind()`); switch to it only when it is ready."""
        ...

    def reply(self, messages: list[dict], settings: SamplingSettings, *, max_tokens: int,
              enable_thinking: bool | None, cancel: threading.Event,
              prefill_progress: PrefillProgress | None = None,
              save_to: Path | None = None,
              handover: Callable[[], float] | None = None) -> Iterator[GenerationResponse]:
        """Stream one assistant reply to `messages`; then save the session state to `save_to`.
        `handover`: asked each time the caller has taken all it was given, how long (seconds)
        tokens may gather before the next are handed to it (0: at the next token)."""
        ...

    def bind(self, key: ChatKey, state_path: Path | None) -> str:
        """Give the session to chat `key`: "kept" | "loaded" | "reset" | "mismatch"."""
        ...

    def last_turn(self) -> TurnStats:
        """The prompt side of the last reply (cache reuse, dropped messages)."""
        ...

    def session_stats(self) -> dict[str, int]:
        """Cheap context figures for the gauge: at least "context_used" and "n_ctx"."""
        ...

    def measure_bandwidth(self) -> float | None:
        """The machine's read bandwidth in bytes/s (slow the first time: a worker only), or None."""
        ...

    def stats(self) -> BackendStats: ...
