"""EngineBackend: the swap on load against stand-in engine objects (a load can be held
open), and one run on the real engine with a tiny generated model.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path

import pytest

from engine.generate import GenerationResponse
from engine.sampling import SamplingSettings
from engine.session import TurnStats


class StubSession:
    """engine.session.ChatSession's surface as EngineBackend uses it."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.kv_bytes = 0
        self.tokens = []
        self.last_turn = TurnStats()
        self.n_ctx = 512
        self.replies = 0

    def reset(self):
        self.tokens = []
        self.kv_bytes = 0
        self.last_turn = TurnStats()

    def stats(self) -> dict:
        return {"context_used": len(self.tokens), "n_ctx": self.n_ctx, "kv_bytes": self.kv_bytes,
                "state_bytes": 4096, "checkpoint_bytes": 0, "checkpoints": 0}

    def reply(self, messages, settings, max_tokens=512, cancel=None, prefill_progress=None,
              enable_thinking=None):
        self.rendered = (messages, enable_thinking)
        self.replies += 1
        prompt = list(range(10))
        self.last_turn = TurnStats(prompt_tokens=len(prompt), reused_tokens=0, prefilled_tokens=len(prompt),
                                   mode="full")
        if prefill_progress:
            prefill_progress(len(prompt), len(prompt))
        self.tokens = list(prompt)
        self.kv_bytes = 1000
        for i, w in enumerate(["Hi", " from", " " + self.loaded.path.name]):
            yield GenerationResponse(w, i, len(prompt), 100.0, 0.1, i + 1, 20.0, "stop" if i == 2 else None)


@pytest.fixture
def stub_engine(monkeypatch):
    calls = {"warm": 0, "block": None}

    def load_model(path, n_ctx=None, within_training_context=False):
        if calls["block"] is not None:
            calls["block"].wait(5)
        if "bad" in str(path):
            from engine.errors import ModelFileError

            raise ModelFileError(path, "not a GGUF file")
        from engine.hugepages import PagesReport

        gguf = types.SimpleNamespace(close=lambda: None, pages=PagesReport(100 << 20, 98 << 20))
        model = types.SimpleNamespace(weight_bytes=123_000, n_ctx=512)
        template = types.SimpleNamespace(supports_thinking=True, is_fallback="base" in str(path))
        return types.SimpleNamespace(path=Path(path), arch="llama", file_size=200_000, model=model,
                                     gguf=gguf, template=template)

    def warm_up(model, say=None):
        calls["warm"] += 1
        return 0.5

    runtime = types.SimpleNamespace(set_threads=lambda n: 2, threading_layer=lambda: "omp",
                                    threads_in_use=lambda: {"threads": 1, "max_threads": 2, "cpus": 4,
                                                            "policy": "adaptive"},
                                    current_rss_bytes=lambda: 5_000_000, peak_rss_bytes=lambda: 6_000_000,
                                    cpu_features=lambda: ["avx", "fma"], kernel_family=lambda: "avx2")
    monkeypatch.setitem(sys.modules, "engine.loader", types.SimpleNamespace(load_model=load_model))
    monkeypatch.setitem(sys.modules, "engine.session", types.SimpleNamespace(ChatSession=StubSession,
                                                                              TurnStats=TurnStats))
    monkeypatch.setitem(sys.modules, "engine.warmup", types.SimpleNamespace(warm_up=warm_up))
    monkeypatch.setitem(sys.modules, "engine.runtime", runtime)
    import engine

    monkeypatch.setattr(engine, "runtime", runtime, raising=False)
    return calls


def test_engine_backend_loads_replies_and_reports(stub_engine, tmp_path):
    from chatapp.engine_backend import EngineBackend

    b = EngineBackend()
    stages = []
    info = b.load(tmp_path / "a.gguf", lambda s, f: stages.append(s))
    assert stages == ["open", "validate", "compile", "warm", "ready"]
    assert (info.arch, info.n_ctx, info.supports_thinking, info.compile_seconds) == ("llama", 512, True, 0.5)
    # the first-reply warm-up ran a real (short) reply, then left the session empty
    assert b._session.replies == 1 and b._session.tokens == [] and b.session_stats()["context_used"] == 0
    assert not info.base_model and b.load(tmp_path / "base.gguf").base_model
    info = b.load(tmp_path / "a.gguf")
    progress = []
    out = list(b.reply([{"role": "user", "content": "x"}], SamplingSettings(), max_tokens=8,
                       enable_thinking=False, cancel=threading.Event(),
                       prefill_progress=lambda d, t: progress.append((d, t))))
    assert "".join(r.text for r in out) == "Hi from a.gguf"
    assert progress == [(10, 10)]
    assert b.last_turn().prompt_tokens == 10
    st = b.stats()
    assert (st.model_bytes, st.kv_bytes, st.state_bytes, st.checkpoint_bytes) == (123_000, 1000, 4096, 0)
    assert st.threading_layer == "omp" and st.rss_bytes == 5_000_000 and st.context_used == 10
    assert st.kernel_family == "avx2" and st.cpu_features == ["avx", "fma"]
    assert st.weight_pages == "weights on 2 MB pages: 98%"   # the loader's report, for the overlay
    # the threads the policy uses now (the overlay's "threads 1 of 2 (adaptive)")
    assert (st.threads, st.threads_max, st.threads_policy, st.cpus) == (1, 2, "adaptive", 4)


def test_engine_backend_keeps_the_old_model_until_the_new_one_is_ready(stub_engine, tmp_path):
    from chatapp.engine_backend import EngineBackend
    from engine.errors import ModelFileError

    b = EngineBackend()
    b.load(tmp_path / "a.gguf")
    gate = threading.Event()
    stub_engine["block"] = gate
    t = threading.Thread(target=b.load, args=(tmp_path / "b.gguf",))
    t.start()
    # while b loads, a still answers
    text = "".join(r.text for r in b.reply([], SamplingSettings(), max_tokens=8, enable_thinking=None,
                                            cancel=threading.Event()))
    assert text.endswith("a.gguf") and b.info.name == "a.gguf"
    gate.set()
    t.join(5)
    assert b.info.name == "b.gguf"
    stub_engine["block"] = None
    with pytest.raises(ModelFileError):
        b.load(tmp_path / "bad.gguf")
    assert b.info.name == "b.gguf"


def test_engine_backend_on_the_real_engine(tiny_llama_path):
    from chatapp.engine_backend import EngineBackend

    b = EngineBackend(n_ctx=256)
    info = b.load(tiny_llama_path)
    assert info.arch == "llama" and info.n_ctx == 256
    assert info.warm_up_seconds > 0 and b.session_stats()["context_used"] == 0 and not info.base_model
    msgs = [{"role": "user", "content": "hello"}]
    greedy = SamplingSettings(temperature=0)
    first = list(b.reply(msgs, greedy, max_tokens=4, enable_thinking=None, cancel=threading.Event()))
    text = "".join(r.text for r in first)
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
    list(b.reply(msgs, greedy, max_tokens=4, enable_thinking=None, cancel=threading.Event()))
    turn = b.last_turn()
    assert turn.reused_tokens > 0 and turn.prefilled_tokens < turn.prompt_tokens  # the history was reused
    st = b.stats()
    assert st.kv_bytes > 0 and st.context_used > 0 and st.model_bytes > 0


def test_engine_backend_marks_a_file_without_chat_template_as_base_model(tmp_path):
    from chatapp.engine_backend import EngineBackend
    from chatapp.discovery import Candidate
    from chatapp.model_headers import describe
    from tests.tiny_models import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny-base.gguf", chat_template=False)
    assert not describe(Candidate(path, "models", path.name)).has_chat_template
    info = EngineBackend(n_ctx=128).load(path)
    assert info.base_model


def test_engine_backend_speculate_mtp_falls_back_to_plain_for_a_file_without_the_block(tiny_llama_path):
    from pathlib import Path

    from chatapp.engine_backend import EngineBackend

    notices: list[str] = []
    b = EngineBackend(n_ctx=128, speculate="mtp")
    b.on_notice = notices.append
    b.load(tiny_llama_path)                       # loads, with a notice: no MTP block in a llama file
    assert b._session is not None and b._session.speculator is None
    assert len(notices) == 1 and "speculative decoding is off" in notices[0] and "Qwen3.5" in notices[0]
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "qwen35_mtp" / "tiny-mtp-q8_0.gguf"
    b.load(fixture)
    assert b._session.speculator is not None and b._session.speculator.mode == "mtp"
    msgs = [{"role": "user", "content": "hello"}]
    rs = list(b.reply(msgs, SamplingSettings(temperature=0), max_tokens=6, enable_thinking=None,
                      cancel=threading.Event()))
    assert rs and b._session.speculator.stats.steps > 0


def test_engine_backend_speculate_draft_from_the_config_and_bad_settings_fall_back(tiny_llama_path):
    """"speculate": "draft" with "draft_model" drafts with that model (the same tokens as plain);
    without a draft model, with an unknown mode or a file that is not a model: a notice, plain
    decoding, the model still loads."""
    from chatapp.engine_backend import EngineBackend

    msgs = [{"role": "user", "content": "hello there, hello there"}]

    def reply(b):
        return [r.token for r in b.reply(msgs, SamplingSettings(temperature=0), max_tokens=12, enable_thinking=None,
                                          cancel=threading.Event())]

    plain = EngineBackend(n_ctx=128)
    plain.load(tiny_llama_path)
    b = EngineBackend(n_ctx=128, speculate="draft", draft_model=str(tiny_llama_path))
    b.load(tiny_llama_path)
    assert b._session.speculator is not None and b._session.speculator.mode == "draft"
    assert reply(b) == reply(plain)
    for speculate, draft, says in (("draft", None, '"draft_model"'), ("fast", None, "must be one of"),
                                   ("draft", str(tiny_llama_path.parent / "missing.gguf"), "missing.gguf")):
        notices: list[str] = []
        b = EngineBackend(n_ctx=128, speculate=speculate, draft_model=draft)
        b.on_notice = notices.append
        b.load(tiny_llama_path)
        assert b._session.speculator is None
        assert len(notices) == 1 and "speculative decoding is off" in notices[0] and says in notices[0], notices
