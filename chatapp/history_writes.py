"""Changes to the chat history that another program's write lock must not lose.

A rename, a deletion or new chat settings is one write on the UI thread (sqlite3 connections
are per thread). When another program holds the history's write lock longer than the store's
busy timeout, the write raises `HistoryBusyError`; `HistoryWriter` then keeps the change,
says so in one line, waits for the lock in a background thread (never on the UI thread) and
applies the kept changes, in order, on the UI thread once it is free. While changes wait,
a new one queues behind them, so they land in the order the user made them. If the lock is
still held after `wait_seconds`, the user is told once that the changes are still waiting;
the waiting goes on until the app quits.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from chatapp.history_db import HistoryBusyError, HistoryDB

log = logging.getLogger("deltatalk")

WAIT_SECONDS = 5.0     # a wait round; after the first one the user hears that changes still wait


@dataclass
class _Change:
    what: str                          # for the user: "the new title", "the deletion", ...
    apply: Callable[[], object]        # the write (UI thread); raises HistoryBusyError when locked
    then: Callable[[], None] | None    # run on the UI thread after the write succeeded


class HistoryWriter:
    """Apply history writes now, or keep them until another program releases the lock.

    `notify(text)` shows one line to the user (UI thread); `call_on_ui(fn)` runs `fn` on the UI
    thread from the waiting thread; `quitting` ends the wait.
    """

    def __init__(self, store: HistoryDB, *, notify: Callable[[str], None],
                 call_on_ui: Callable[[Callable[[], None]], None], quitting: threading.Event,
                 wait_seconds: float = WAIT_SECONDS):
        self.store = store
        self.notify = notify
        self.call_on_ui = call_on_ui
        self.quitting = quitting
        self.wait_seconds = wait_seconds
        self._kept: deque[_Change] = deque()   # touched on the UI thread only
        self._waiter: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Changes kept until the lock is free."""
        return len(self._kept)

    def write(self, what: str, apply: Callable[[], object], then: Callable[[], None] | None = None) -> bool:
        """(UI thread.) Apply the change now (True), or keep it for when the lock is free (False)."""
        self._kept.append(_Change(what, apply, then))
        if len(self._kept) > 1:    # earlier changes still wait: this one lands after them
            self.notify(f"The chat history is still locked by another program; {what} is saved after "
                        "the changes waiting before it.")
            return False
        return self._apply_kept()

    def _apply_kept(self) -> bool:
        """(UI thread.) Apply the kept changes in order; on a busy lock, wait in the background."""
        while self._kept:
            change = self._kept[0]
            try:
                change.apply()
            except HistoryBusyError:
                if self._waiter is None:
                    self.notify(f"The chat history is locked by another program; {change.what} is saved as "
                                "soon as it is free.")
                    self._start_waiting()
                return False
            self._kept.popleft()
            if change.then is not None:
                change.then()
        return True

    def _start_waiting(self) -> None:
        self._waiter = threading.Thread(target=self._wait, name="history-lock-wait", daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        """(Waiting thread.) Wait for the lock, then apply the kept changes on the UI thread."""
        told = False
        while not self.quitting.is_set():
            if self.store.wait_writable(self.wait_seconds, self.quitting):
                break
            if not told and not self.quitting.is_set():
                told = True
                self._on_ui(lambda: self.notify(
                    f"The chat history is still locked by another program after {self.wait_seconds:.0f} s; "
                    f"{self.pending} change(s) are kept and saved when it is free."))
        if self.quitting.is_set():
            if self._kept:
                log.warning("quitting with %d history change(s) not saved: the history stayed locked",
                            len(self._kept))
            return
        self._on_ui(self._resume)

    def _resume(self) -> None:
        """(UI thread.) The lock was free a moment ago: apply what was kept (it may be taken again)."""
        self._waiter = None
        if self._apply_kept():
            self.notify("The chat history is free again; the kept changes are saved.")

    def _on_ui(self, fn: Callable[[], None]) -> None:
        try:
            self.call_on_ui(fn)
        except RuntimeError as e:   # the app is closing: nothing to show the user any more
            log.info("history writer: could not reach the UI: %r", e)
