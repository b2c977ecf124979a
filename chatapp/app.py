"""The deltatalk chat TUI: the App (start-up, the history's lock, keys, palette, speed overlay).

Who does what (messages go up, attributes go down; docs/ARCHITECTURE.md has the flow):

- the App's base classes: `chatapp.app_models.ModelsApp` (the backend in use, loading, the
  picker, endpoints), `chatapp.app_chats.ChatsApp` (open, new, delete, rename, export, settings).
- `chatapp.chat_view.ChatView`: the open chat (transcript, gauge, prompt box) and a reply's
  whole life; `chatapp.reply_stream` is the reply's thread worker and its pacing.
- `chatapp.model_loader.LoadBar`: the load line and the workers that load, fetch and scan.
- `chatapp.screens`: the dialogs; `chatapp.widgets`: the gauge and the speed overlay.

Threads. The UI runs on the main thread and never blocks: every model load, reply, session
bind, history wait and stats read runs in a thread worker. `EngineBackend` hands every kernel
call to the process's one kernel thread (`engine.kernel_thread`: a second live thread that has
run parallel kernels keeps a second OpenMP team and halves decode speed), so a reply worker
iterates tokens that the kernel thread hands over in batches (when its next batch of text is
due: `reply_stream`'s handover; a wake-up per token would steal a core from the compute threads).
A load on the kernel thread waits for a running reply; the backend switches to the new
model only when it is ready, so the previous one keeps answering meanwhile.

The GIL. The kernels release it, but the Python between them (a decode step's embedding,
sampling, the hand-over) needs it, and a thread that wants it back from a busy UI waits up to
Python's switch interval (5 ms by default: most of a 6 ms token). The app sets it to
SWITCH_INTERVAL_S, measured: the TUI decoded at 0.56 of `deltatalk run` on 2 cores with 5 ms,
0.81 with 0.5 ms (`tools/tui_speed.py`).

Adaptive batches. Each millisecond the UI spends rendering is CPU the compute threads do not
get (on 2 cores the team then waits for a member). Where the engine may take every CPU, the
reply worker posts text every `BatchPacer.seconds`, from 1 s, narrowed while the UI's own
share of CPU time stays under ~2%; with a core to spare, every 40 ms (chatapp.reply_stream).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from textual import work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Header, Input, TextArea

from chatapp.app_chats import ChatsApp
from chatapp.backend import ChatBackend
from chatapp.chat_view import ChatView
from chatapp.config import ASSETS, Config
from chatapp.errors import log, setup_logging
from chatapp.model_loader import LoadBar
from chatapp.paths import data_dir
from chatapp.prompt_input import ChatInput, teach_alt_enter
from chatapp.screens import HelpScreen
from chatapp.history_writes import HistoryWriter
from chatapp.store import ChatStore, HistoryBusyError, wait_until_writable
from chatapp.transcript import Transcript, warm_reply_parser
from chatapp.widgets import Gauge, SpeedOverlay, TurnRecord

HISTORY_WAIT_SECONDS = 600.0  # how long a worker waits for another program's lock on the history
QUIT_PRESS_SECONDS = 2.0      # Ctrl+C twice within this (while idle) quits
SWITCH_INTERVAL_S = 0.0005    # the GIL switch interval while the app runs (Python's default: 0.005)


class DeltatalkApp(ChatsApp):
    TITLE = "deltatalk"
    CSS_PATH = str(ASSETS / "deltatalk.tcss")

    # footer order = importance: at 80 columns the ones on the right are cut (Help and Settings must stay)
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="stop", show=False),
        Binding("ctrl+c", "interrupt", "Stop / quit", id="interrupt", show=False, priority=True),
        Binding("f1", "help", "Help", id="help"),
        Binding("ctrl+o", "pick_model", "Model", id="pick_model"),
        Binding("ctrl+n", "new_chat", "New", id="new_chat"),
        Binding("ctrl+l", "chat_list", "Chats", id="chat_list"),
        Binding("ctrl+s", "chat_settings", "Settings", id="chat_settings"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
        Binding("ctrl+g", "edit_last", "Edit last", id="edit_last"),
        Binding("f2", "toggle_speed", "Speed", id="toggle_speed"),
        Binding("ctrl+t", "toggle_thinking", "Thinking", id="toggle_thinking", show=False),
        Binding("f3", "copy_reply", "Copy reply", id="copy_reply", show=False),
        Binding("f4", "copy_code", "Copy code", id="copy_code", show=False),
    ]

    def __init__(self, backend: ChatBackend | None = None, *, model_path: Path | None = None,
                 config: Config | None = None, find_models: Callable[[], list] | None = None,
                 offer_fetch: bool = True, endpoint=None):
        super().__init__(backend, config or Config.load(), model_path=model_path, find_models=find_models,
                         offer_fetch=offer_fetch, endpoint=endpoint)
        teach_alt_enter()
        self.log_path: Path | None = None
        self._last_interrupt = 0.0       # when Ctrl+C was last pressed while idle
        self._speed_timer: Timer | None = None
        self._speed_overlay: SpeedOverlay | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        self._load_bar = LoadBar(id="loadbar")
        self._chat_view = ChatView(self.config, self.backend, id="chat")
        yield self._load_bar
        yield self._chat_view
        yield Footer()
        self._speed_overlay = SpeedOverlay(id="speed")
        yield self._speed_overlay

    # what the chat view shows and owns, read here (and by tests)
    @property
    def messages_view(self) -> Transcript:
        return self.chat_view.transcript

    @property
    def gauge(self) -> Gauge:
        return self.chat_view.gauge

    @property
    def chat_input(self) -> ChatInput:
        return self.chat_view.chat_input

    @property
    def turns(self) -> list[TurnRecord]:
        return self.chat_view.turns

    async def on_mount(self):
        sys.setswitchinterval(SWITCH_INTERVAL_S)   # the engine's Python gets the GIL back soon (docstring)
        self.log_path = setup_logging()
        log.info("deltatalk TUI starting")
        if self.config.problem:
            self.notify(self.config.problem, severity="warning", title="Config")
        theme = self.config.get("theme")
        if theme and theme in self.available_themes:
            self.theme = theme
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        try:
            self.set_keymap(self.config.keymap)
        except Exception as e:  # noqa: BLE001
            self._error(e, "keymap in the config")
        notice = self._open_store()
        self.chat_input.focus()
        await self._open_last_chat()
        if self.chat is None:
            self.chat_view.restore_draft()
        if notice:   # after the chat is shown, so it stays in view
            await self.chat_view.transcript.add_notice(notice)
        self.startup_model()
        self._warm_reply_parser()

    @work(thread=True, group="warm", exit_on_error=False)
    def _warm_reply_parser(self):
        warm_reply_parser()   # (while the model loads, off the UI thread)

    def _theme_changed(self, theme):
        if self.config.get("theme") != theme.name:
            try:
                self.config.set("theme", theme.name)
            except OSError as e:
                self._error(e, "saving the theme")

    def on_unmount(self):
        self._quitting.set()
        if self.store is not None:
            self.store.close()

    # -- the chat history -------------------------------------------------------------------
    def _open_store(self) -> str | None:
        """Open the history; returns what the user must be told (also shown as a toast), if anything."""
        notice = None
        try:
            self.store = ChatStore(data_dir() / "chats.sqlite3")
            self.chat_view.store = self.store
            self.history_writer = HistoryWriter(self.store, notify=self._history_notice,
                                                call_on_ui=self.call_from_thread, quitting=self._quitting)
            notice = self.store.notice
        except HistoryBusyError:
            notice = "The chat history is locked by another program: waiting for it (Enter keeps your text)."
            self._wait_for_history(data_dir() / "chats.sqlite3", self._store_free)
        except Exception as e:  # noqa: BLE001
            self._error(e, "opening the chat history")
        if notice:
            log.warning("%s", notice)
            self.notify(notice, severity="warning", title="Chat history", timeout=30)
        return notice

    async def _store_free(self):
        if self.store is not None:
            return
        notice = self._open_store()
        if self.store is not None:
            self.notify("The chat history is available again.", timeout=5)
            if self.chat is None:
                await self._open_last_chat()
        if notice:
            await self.chat_view.transcript.add_notice(notice)

    def _history_notice(self, text: str):
        log.warning("%s", text)
        self.notify(text, severity="warning", title="Chat history", timeout=20)

    def on_chat_view_history_locked(self, m: ChatView.HistoryLocked):
        log.warning("%s", m.text)
        self.notify(m.text, severity="warning", title="Chat history", timeout=20)
        self.call_later(self.chat_view.transcript.add_notice, m.text)
        if m.retry is not None:
            self._wait_for_history(self.store.path if self.store else data_dir() / "chats.sqlite3", m.retry)

    @work(thread=True, group="history", exit_on_error=False)
    def _wait_for_history(self, path: Path, then: Callable):
        """Another program holds the history's write lock: wait here, then run `then` on the UI."""
        if wait_until_writable(path, HISTORY_WAIT_SECONDS, self._quitting) and not self._quitting.is_set():
            self.call_from_thread(then)

    # -- the reply: the chat view's (the keys are here, so the footer keeps its order) -------------
    def action_stop(self):
        self.chat_view.stop()

    async def action_regenerate(self):
        await self.chat_view.regenerate()

    async def action_edit_last(self):
        await self.chat_view.edit_last()

    def code_blocks(self) -> list[str]:
        return self.chat_view.code_blocks()

    def action_copy_reply(self):
        text = self.chat_view.transcript.last_reply()
        if not text:
            self.notify("No reply to copy.", severity="warning")
            return
        self.copy_to_clipboard(text)
        self.notify("Copied the last reply.")

    def action_copy_code(self, index: int = -1):
        blocks = self.code_blocks()
        if not blocks:
            self.notify("The last reply has no code block.", severity="warning")
            return
        self.copy_to_clipboard(blocks[index])
        n = len(blocks) + index + 1 if index < 0 else index + 1
        self.notify(f"Copied code block {n} of {len(blocks)}.")

    # -- speed overlay / help ---------------------------------------------------------------------
    def action_toggle_speed(self):
        overlay = self._speed_overlay
        if overlay is None:
            return
        overlay.display = not overlay.display
        if overlay.display:
            self._refresh_speed()
            if self._speed_timer is None:
                self._speed_timer = self.set_interval(1.0, self._refresh_speed)
        elif self._speed_timer is not None:
            self._speed_timer.stop()
            self._speed_timer = None

    def on_chat_view_figures_changed(self):
        self._refresh_speed()

    def _refresh_speed(self):
        overlay = self._speed_overlay
        if overlay is not None and overlay.is_attached and overlay.display and self.chat_view_mounted():
            view = self.chat_view
            turns = view.turns + ([view.gauge.turn] if view.generating else [])
            overlay.refresh_figures(self.backend, turns)

    def action_help(self):
        try:
            text = (ASSETS / "help.md").read_text(encoding="utf-8")
        except OSError:
            text = "# deltatalk\n\nCtrl+P opens the command palette."
        if self.log_path:
            text += f"\n\nLog file: `{self.log_path}`\n"
        self.push_screen(HelpScreen(text))

    # -- keys that users bring from other tools --------------------------------------------------
    def action_scroll_transcript(self, where: str):
        """PageUp / PageDown / Ctrl+Home / Ctrl+End in the prompt box scroll the transcript."""
        self.messages_view.page(where)

    def action_interrupt(self):
        """Ctrl+C: copy a selection if there is one; else stop a running reply; else quit if pressed twice."""
        focused = self.focused
        if isinstance(focused, (TextArea, Input)) and focused.selected_text:
            focused.action_copy()
            return
        if self.screen.get_selected_text():
            self.screen.action_copy_text()
            return
        if self.generating:
            self.chat_view.stop()
            self._last_interrupt = 0.0
            return
        now = time.monotonic()
        if now - self._last_interrupt <= QUIT_PRESS_SECONDS:
            self.call_later(self.action_quit)
            return
        self._last_interrupt = now
        self.notify("Press Ctrl+C again to quit (or Ctrl+Q).", title="Quit?", timeout=QUIT_PRESS_SECONDS)

    async def action_quit(self):
        self.chat_view.save_draft()
        self.exit()

    # -- command palette ---------------------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        cmds = [
            ("Switch model", "Choose a GGUF model (Ctrl+O)", self.action_pick_model),
            ("New chat", "Start a new chat (Ctrl+N)", self.action_new_chat),
            ("Chats", "Open, rename or delete chats (Ctrl+L)", self.action_chat_list),
            ("Rename chat", "Rename the current chat", self.action_rename_chat),
            ("Delete chat", "Delete the current chat", self.action_delete_current_chat),
            ("Stop", "Stop the reply (Esc)", self.action_stop),
            ("Regenerate", "Answer the last message again (Ctrl+R)", self.action_regenerate),
            ("Edit last message", "Put your last message back in the input (Ctrl+G)", self.action_edit_last),
            ("Chat settings", "System prompt and sampling for this chat (Ctrl+S)", self.action_chat_settings),
            ("Toggle thinking", "Thinking on/off for this chat (Ctrl+T)", self.action_toggle_thinking),
            ("Speed overlay", "Show or hide speeds and memory (F2)", self.action_toggle_speed),
            ("Copy last reply", "Copy the last reply to the clipboard (F3)", self.action_copy_reply),
            ("Export chat", "Save this chat as a Markdown file", self.action_export),
            ("Help", "Keys and tips (F1)", self.action_help),
        ]
        for title, help_text, cb in cmds:
            yield SystemCommand(title, help_text, cb)
        blocks = self.code_blocks() if self.is_running else []
        for i, b in enumerate(blocks):
            first = b.strip().splitlines()[0][:40] if b.strip() else ""
            yield SystemCommand(f"Copy code block {i + 1}", first or "(empty)",
                                lambda i=i: self.action_copy_code(i))


def run_tui(model: Path | None = None, threads: int | None = None, ctx: int | None = None,
            system: str | None = None, endpoint=None, sampling: dict | None = None,
            max_tokens: int | None = None) -> int:
    """Run the app. Command-line values override the config for this run only (not saved).

    `sampling`: the sampling flags given on the command line (SamplingSettings field names, and
    max_tokens); each one overrides the config's, and a chat's own settings override it
    (see chatapp.screens.chat_settings). `max_tokens`: --max-tokens when given."""
    if max_tokens is not None:
        sampling = {**(sampling or {}), "max_tokens": max_tokens}
    config = tui_config(threads=threads, ctx=ctx, system=system, sampling=sampling)
    app = DeltatalkApp(model_path=model, config=config, endpoint=endpoint)
    app.run()
    return app.return_code or 0


def tui_config(*, threads: int | None = None, ctx: int | None = None, system: str | None = None,
               sampling: dict | None = None) -> Config:
    config = Config.load()
    if threads:
        config.overrides["threads"] = threads
    if ctx:
        config.overrides["context"] = ctx
    if system is not None:
        config.overrides["system_prompt"] = system
    flags = dict(sampling or {})
    if "max_tokens" in flags:
        config.overrides["max_tokens"] = flags.pop("max_tokens")
    if flags:
        config.overrides["sampling"] = {**(config.get("sampling") or {}), **flags}
    return config
