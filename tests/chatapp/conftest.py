"""Fixtures and helpers for the TUI tests: an isolated home, the app on a FakeBackend, waiting,
sending, and what the screen shows (message boxes, notifications)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """DELTATALK_HOME and HOME in a temp dir: no real config, chats, models or caches are seen."""
    monkeypatch.setenv("DELTATALK_HOME", str(tmp_path / "dt"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DELTATALK_MODELS_DIR", raising=False)
    for var in ("HF_HOME", "HF_HUB_CACHE", "OLLAMA_MODELS"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.fixture
def fake_model(home) -> Path:
    p = home / "fake-model.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 60)
    return p


async def wait_until(pilot, predicate, timeout: float = 5.0, what: str = "condition"):
    """Poll the app until predicate() is true (background workers make a single pause flaky)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what} after {timeout:g} s; {app_state(pilot.app)}")


def app_state(app) -> str:
    """What the app shows and does, for a wait's failure message (a rare timeout says why)."""
    try:
        view = app.chat_view
        parts = [f"screen {type(app.screen).__name__}", f"loading {app.loading!r}",
                 f"generating {view.generating}", f"workers {[w.name for w in app.workers]}",
                 f"notifications {notes(app)}", f"boxes {[(b.role, b.status, b.content[:40]) for b in boxes(app)]}",
                 f"chat notices {[str(w.render())[:80] for w in app.query('.chat-notice')]}"]
    except Exception as e:  # noqa: BLE001 - a diagnostic must never hide the timeout itself
        parts = [f"(state unavailable: {e!r})"]
    return "; ".join(parts)


def make_app(backend=None, **kw):
    from chatapp.app import DeltatalkApp
    from tests.fakes import FakeBackend

    kw.setdefault("offer_fetch", False)
    kw.setdefault("find_models", lambda: [])
    return DeltatalkApp(backend or FakeBackend(), **kw)


async def ready(pilot, app):
    """Wait until the startup model is loaded."""
    await wait_until(pilot, lambda: app.backend.info is not None and app.loading is None, what="model loaded")


async def send(pilot, app, text: str):
    app.chat_input.text = text
    app.chat_input.focus()
    await pilot.press("enter")


async def wait_reply(pilot, app, timeout=5.0):
    await wait_until(pilot, lambda: not app.generating, timeout, what="reply finished")
    await pilot.pause()


def boxes(app, role: str | None = None) -> list:
    """The transcript's message boxes (of one role), in order."""
    from chatapp.transcript import MessageBox

    return [b for b in app.query(MessageBox) if role is None or b.role == role]


def notes(app, severity: str | None = None) -> list[str]:
    return [n.message for n in app._notifications if severity is None or n.severity == severity]


@pytest.fixture
def model_tree(home):
    """A tiny llama in the models folder, plus copies in an HF cache, LM Studio and Ollama, and bad files."""
    from chatapp.paths import models_dir
    from tests.tiny_models import write_tiny_llama

    md = models_dir()
    md.mkdir(parents=True)
    tiny = write_tiny_llama(md / "tiny-llama.gguf")
    (md / "truncated.gguf").write_bytes(tiny.read_bytes()[:100])
    h = home / "home"
    snap = h / ".cache/huggingface/hub/models--org--Tiny-GGUF/snapshots/abc123"
    snap.mkdir(parents=True)
    shutil.copy(tiny, snap / "tiny-hf.Q8_0.gguf")
    lms = h / ".lmstudio/models/someone/tiny"
    lms.mkdir(parents=True)
    shutil.copy(tiny, lms / "tiny-lms.gguf")
    om = h / ".ollama/models"
    (om / "blobs").mkdir(parents=True)
    shutil.copy(tiny, om / "blobs" / "sha256-0123abcd")
    (om / "blobs" / "sha256-notgguf").write_bytes(b"{}")
    man = om / "manifests/registry.ollama.ai/library/tiny"
    man.mkdir(parents=True)
    (man / "latest").write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:0123abcd"},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:notgguf"}]}))
    return {"tiny": tiny, "hf": snap / "tiny-hf.Q8_0.gguf", "ollama": om / "blobs" / "sha256-0123abcd"}
