"""The chat screen's live gauge and speed overlay (messages: chatapp.transcript; prompt box: chatapp.prompt_input)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Label, Static

from chatapp.backend import BackendStats, ChatBackend
from chatapp.discovery import human_bytes
from chatapp.errors import log_exception
# moved: the prompt box to chatapp.prompt_input, messages to chatapp.transcript (old import path kept)
from chatapp.prompt_input import ChatInput  # noqa: F401
from chatapp.transcript import STATUS_NOTES, MessageBox  # noqa: F401


# -- the live gauge -----------------------------------------------------------------------
SPARK_WIDTH = 16              # columns of the gauge's sparkline
SPARK_TOKENS_PER_COLUMN = 4   # generated tokens averaged into one column
SPARK_LEVELS = " ▁▂▃▄▅▆▇█"


@dataclass
class TurnRecord:
    """Figures of one reply, for the gauge and the speed overlay."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    prefill_done: int = 0
    prefill_total: int = 0
    prompt_tps: float = 0.0
    ttft_s: float = 0.0
    decode_tps: float = 0.0
    generated: int = 0
    context_used: int = 0
    finish: str | None = None
    speculation: dict | None = None   # drafted, accepted, acceptance, tokens_per_step (speculative decoding)
    # decode tok/s per column of SPARK_TOKENS_PER_COLUMN tokens: [sum, count]; the last may be partial
    speed_columns: deque = field(default_factory=lambda: deque(maxlen=SPARK_WIDTH))

    def record_speed(self, new_tokens: int, decode_tps: float):
        """Add `new_tokens` tokens decoded at `decode_tps`. Columns are counted in tokens, so the
        sparkline does not depend on how the tokens were batched into UI updates."""
        for _ in range(min(new_tokens, SPARK_WIDTH * SPARK_TOKENS_PER_COLUMN)):
            if not self.speed_columns or self.speed_columns[-1][1] >= SPARK_TOKENS_PER_COLUMN:
                self.speed_columns.append([0.0, 0])
            column = self.speed_columns[-1]
            column[0] += decode_tps
            column[1] += 1

    def stored_stats(self, finish: str | None, model: str | None, dropped: int = 0) -> dict:
        """The figures kept with the reply in the history (Message.stats)."""
        stats = {"decode_tps": self.decode_tps, "prompt_tps": self.prompt_tps, "ttft_s": self.ttft_s,
                 "generated": self.generated, "prompt_tokens": self.prompt_tokens,
                 "reused_tokens": self.reused_tokens, "finish": finish, "model": model}
        if dropped:
            stats["dropped_messages"] = dropped
        return stats

    def speed_history(self) -> list[float]:
        return [total / count for total, count in self.speed_columns]


def spark_text(values, width: int = SPARK_WIDTH) -> str:
    """Recent decode speeds as block characters, newest on the right.

    The scale starts at zero (a steady speed is a full bar, a halving shows as half height),
    not at the window's minimum, and no column inside the window is ever blank.
    """
    values = list(values)[-width:]
    top = max(values, default=0.0)
    if top <= 0:
        return " " * width
    steps = len(SPARK_LEVELS) - 1
    return "".join(SPARK_LEVELS[max(1, min(steps, round(v / top * steps)))] for v in values).rjust(width)


class _FittedLabel(Label):
    """One line whose text is made for its width, and made again whenever the width changes."""

    def __init__(self, make, **kw):
        super().__init__("", **kw)
        self.make = make   # make(width or None) -> text

    def on_resize(self):
        self.refit()

    def refit(self):
        self.update(self.make(self.size.width or None), layout=False)


def prefill_bar_text(done: int, total: int, width: int = SPARK_WIDTH) -> str:
    """The prompt's prefill progress as a bar of `width` cells (shown where the sparkline goes)."""
    filled = round(width * min(max(done, 0), total) / total) if total > 0 else 0
    return "█" * filled + "░" * (width - filled)


class Gauge(Horizontal):
    """Always visible while generating: tok/s, then the prefill bar and, once tokens come, the
    sparkline in the same place; TTFT, context, reuse.

    Every part has a fixed width while a reply streams and updates change text only: a change of
    size or display re-lays out the screen, UI time that the compute threads lose on a machine
    where they take every core."""

    _prefill_shown = False   # the activity slot shows the prefill bar (start() until the first token)

    DEFAULT_CSS = """
    Gauge { height: 1; padding: 0 1; background: $panel; }
    Gauge > Label { width: auto; margin-right: 1; }
    Gauge #g-tps { text-style: bold; color: $success; width: 12; }
    Gauge #g-spark { width: 16; height: 1; margin-right: 1; color: $success; }
    Gauge #g-details { width: 1fr; height: 1; margin-right: 0; }
    Gauge.idle #g-tps { color: $text-muted; }
    """

    active: reactive[bool] = reactive(False)

    def __init__(self, **kw):
        super().__init__(classes="idle", **kw)
        self.turn = TurnRecord()
        self.n_ctx = 0

    def compose(self) -> ComposeResult:
        yield Label("— tok/s", id="g-tps")
        activity = Label("", id="g-spark")   # the prefill bar, then the sparkline
        activity.display = False
        yield activity
        yield _FittedLabel(self.details_text, id="g-details")

    def watch_active(self, active: bool):
        self.set_class(not active, "idle")

    def start(self, n_ctx: int):
        self.turn = TurnRecord()
        self.n_ctx = n_ctx
        self.active = True
        self._prefill_shown = True
        activity = self.query_one("#g-spark", Label)
        activity.update(prefill_bar_text(0, 1), layout=False)
        activity.display = True   # (before the prompt is fed: the one layout change of a turn)
        self.refresh_text()

    def reset(self):
        """Empty figures (another chat): nothing of the previous chat's last reply stays on screen."""
        self.turn = TurnRecord()
        self.active = False
        self.query_one("#g-spark", Label).display = False
        self._prefill_shown = False
        self.refresh_text()

    def on_prefill(self, done: int, total: int, prompt_tps: float | None = None):
        self.turn.prefill_done, self.turn.prefill_total = done, total
        if prompt_tps is not None:
            self.turn.prompt_tps = prompt_tps
        if self._prefill_shown:
            self.query_one("#g-spark", Label).update(prefill_bar_text(done, total), layout=False)
        self.refresh_text()

    def on_tokens(self, *, decode_tps: float, ttft_s: float, prompt_tps: float, generated: int,
                  context_used: int, prompt_tokens: int, reused_tokens: int, prefilled_tokens: int,
                  dropped_messages: int = 0, speculation: dict | None = None):
        t = self.turn
        t.speculation = speculation
        new_tokens = max(generated - t.generated, 0)
        t.decode_tps, t.ttft_s, t.prompt_tps, t.generated = decode_tps, ttft_s, prompt_tps, generated
        t.context_used = context_used
        t.prompt_tokens, t.reused_tokens, t.prefilled_tokens = prompt_tokens, reused_tokens, prefilled_tokens
        if t.prefill_total == 0 or t.prefill_done < t.prefill_total:
            t.prefill_done = t.prefill_total = max(prefilled_tokens, 1)
        if generated:
            self._prefill_shown = False   # prefill over: the slot becomes the sparkline
        if decode_tps > 0 and new_tokens:
            t.record_speed(new_tokens, decode_tps)
        if not self._prefill_shown:
            self.query_one("#g-spark", Label).update(spark_text(t.speed_history()), layout=False)
        self.refresh_text()

    def show_context(self, stats: dict | None):
        """Between replies: the session's context use (after a chat switch or a model load)."""
        if not stats:
            return
        if stats.get("n_ctx"):
            self.n_ctx = int(stats["n_ctx"])
        if not self.active:
            self.turn.context_used = int(stats.get("context_used", self.turn.context_used))
        self.refresh_text()

    def stop(self, finish: str | None):
        self.turn.finish = finish
        self.active = False
        self.refresh_text()
        self.call_after_refresh(self.refresh_text)

    def tps_text(self) -> str:
        t = self.turn
        return f"{t.decode_tps:6.1f} tok/s" if t.decode_tps > 0 else "  — tok/s"

    def details_text(self, width: int | None = None) -> str:
        """The figures on one line: with `width`, shorter forms and then fewer figures until it fits
        (least important go first: reuse, prompt speed, prefill count)."""
        t = self.turn
        parts = []   # (priority: lower goes first, full form, short form)
        if t.prefill_total and (self.active and t.prefill_done < t.prefill_total or not t.generated):
            parts.append((1, f"{t.prefill_done}/{t.prefill_total}", f"{t.prefill_done}/{t.prefill_total}"))
        if t.prompt_tps:
            parts.append((2, f"{t.prompt_tps:,.0f} tok/s prompt", f"pp {t.prompt_tps:,.0f} t/s"))
        if t.ttft_s:
            parts.append((5, f"TTFT {t.ttft_s * 1000:,.0f} ms", f"TTFT {t.ttft_s * 1000:,.0f} ms"))
        if self.n_ctx:
            parts.append((4, f"ctx {t.context_used:,}/{self.n_ctx:,}", f"ctx {t.context_used:,}/{self.n_ctx:,}"))
        if t.prompt_tokens:
            parts.append((3, f"reused {t.reused_tokens:,} of {t.prompt_tokens:,} prompt tokens",
                          f"reused {t.reused_tokens:,}/{t.prompt_tokens:,}"))
        text = " · ".join(p[1] for p in parts)
        if width is None or len(text) <= width:
            return text
        short = [(p[0], p[2]) for p in parts]
        while short and len(" · ".join(p[1] for p in short)) > width:
            short.remove(min(short, key=lambda p: p[0]))
        return " · ".join(p[1] for p in short)

    def refresh_text(self):
        # fixed sizes: a repaint, never a layout of the screen (the UI must not pace the engine)
        self.query_one("#g-tps", Label).update(self.tps_text(), layout=False)
        self.query_one("#g-details", _FittedLabel).refit()

    def on_resize(self):
        self.refresh_text()


# -- the speed overlay ----------------------------------------------------------------------
class SpeedOverlay(Static):
    """Per-turn speeds, memory, threads and the share of the memory-bandwidth bound."""

    DEFAULT_CSS = """
    SpeedOverlay {
        layer: overlay; dock: right; width: 60; height: auto; max-height: 100%;
        margin: 1 1; padding: 1 2; background: $panel; border: round $accent;
        display: none;
    }
    """

    class StatsRead(Message):
        def __init__(self, stats: BackendStats, turns: list[TurnRecord], model_name: str):
            super().__init__()
            self.stats, self.turns, self.model_name = stats, turns, model_name

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, SpeedOverlay.StatsRead)

    def __init__(self, **kw):
        super().__init__("", **kw)
        self.stats = BackendStats()
        self.turns: list[TurnRecord] = []

    def refresh_figures(self, backend: ChatBackend, turns: list[TurnRecord]):
        """Read the backend's figures in a worker (the first call measures the memory bandwidth)."""
        self._stats_worker(backend, turns)

    @work(thread=True, exclusive=True, group="speed", exit_on_error=False)
    def _stats_worker(self, backend: ChatBackend, turns: list[TurnRecord]):
        try:
            backend.measure_bandwidth()
            stats = backend.stats()
        except Exception as e:  # noqa: BLE001
            log_exception(e, "backend stats")
            return
        self.post_message(self.StatsRead(stats, turns, backend.info.name if backend.info else ""))

    def on_speed_overlay_stats_read(self, m: SpeedOverlay.StatsRead):
        if self.display:
            self.show(m.stats, m.turns, m.model_name)

    def show(self, stats: BackendStats, turns: list[TurnRecord], model_name: str = ""):
        self.stats, self.turns = stats, turns
        self.update(self.render_text(model_name))

    @staticmethod
    def bandwidth_share(model_bytes: int, decode_tps: float, bandwidth: float) -> float | None:
        if model_bytes <= 0 or decode_tps <= 0 or bandwidth <= 0:
            return None
        return model_bytes * decode_tps / bandwidth

    def render_text(self, model_name: str = "") -> str:
        s = self.stats
        lines = ["[b]Speed[/b]" + (f"  [dim]{model_name}[/dim]" if model_name else "")]
        last = [t for t in self.turns if t.generated][-8:]
        if last:
            lines.append("[dim] turn  prefill t/s  decode t/s    TTFT[/dim]")
            n0 = len(self.turns) - len(last)
            for i, t in enumerate(last):
                lines.append(f" {n0 + i + 1:>4}  {t.prompt_tps:>11,.0f}  {t.decode_tps:>10.1f}  "
                             f"{t.ttft_s * 1000:>5,.0f} ms")
            cur = last[-1]
            lines.append(f" reused {cur.reused_tokens:,} of {cur.prompt_tokens:,} prompt tokens, "
                         f"prefilled {cur.prefilled_tokens:,}")
            if cur.speculation:
                sp = cur.speculation
                lines.append(f" speculative: {sp['accepted']:,} of {sp['drafted']:,} drafted accepted "
                             f"({sp['acceptance'] * 100:.0f}%), {sp['tokens_per_step']:.2f} tokens/step")
        else:
            lines.append(" [dim]no replies yet[/dim]")
        lines.append("")
        if s.remote:   # the model runs on a server: speeds are measured here, memory is not ours to see
            lines.append("[b]Memory[/b]")
            lines.append(f" remote ({s.remote})")
            if s.n_ctx:
                lines.append(f" context        {s.context_used:>6,} / {s.n_ctx:,} tokens")
            lines.append("")
            lines.append("[b]Compute[/b]")
            lines.append(" memory bandwidth: remote · tok/s measured at this client")
            return "\n".join(lines)
        lines.append("[b]Memory[/b]")
        lines.append(f" RSS            {human_bytes(s.rss_bytes):>10}  (peak {human_bytes(s.peak_rss_bytes)})")
        lines.append(f" model weights  {human_bytes(s.model_bytes):>10}")
        lines.append(f" KV cache       {human_bytes(s.kv_bytes):>10}")
        lines.append(f" recurrent state{human_bytes(s.state_bytes):>10}")
        lines.append(f" checkpoints    {human_bytes(s.checkpoint_bytes):>10}"
                     + (f"  ({s.checkpoints})" if s.checkpoints else ""))
        if s.n_ctx:
            lines.append(f" context        {s.context_used:>6,} / {s.n_ctx:,} tokens")
        lines.append("")
        lines.append("[b]Compute[/b]")
        of = f" of {s.threads_max} ({s.threads_policy})" if s.threads_policy else ""
        lines.append(f" threads {s.threads}{of} · threading layer {s.threading_layer}")
        if s.cpu_features:
            lines.append(f" CPU {' '.join(s.cpu_features)}")
        if s.kernel_family:
            lines.append(f" kernels {s.kernel_family}")
        bw = s.bandwidth_bytes_s
        src = "measured" if s.bandwidth_measured else "assumed"
        lines.append(f" memory bandwidth {bw / 1e9:.1f} GB/s ({src})")
        if s.weight_pages:
            lines.append(f" {s.weight_pages}")
        if last:
            share = self.bandwidth_share(s.model_bytes, last[-1].decode_tps, bw)
            if share is not None:
                bound = bw / s.model_bytes
                lines.append(f" decode {last[-1].decode_tps:.1f} tok/s = [b]{share * 100:.0f}%[/b] "
                             f"of the bound ({bound:.1f} tok/s)")
        return "\n".join(lines)
