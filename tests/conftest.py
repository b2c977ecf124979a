"""Shared fixtures: the real default model (fetched by the test set-up) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixes NUMBA_CACHE_DIR (engine/kernel_cache.py) in os.environ before any test moves HOME or
# DELTATALK_HOME: this process and the CLI subprocesses of the tests share one kernel cache.
import engine  # noqa: F401

# llama.cpp's outputs on the default model, vendored (see tests/fixtures/llamacpp/README.md).
REFERENCE_DIR = Path(__file__).resolve().parent / "fixtures" / "llamacpp"


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model as the app fetches it (./test runs `deltatalk fetch` first)."""
    env = os.environ.get("DELTATALK_TEST_MODEL")
    if env:
        return Path(env)
    from chatapp.default_model import ensure_default_model

    return ensure_default_model(say=lambda s: None)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.exists():
        pytest.fail(f"llama.cpp reference outputs not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    from tests.tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")
