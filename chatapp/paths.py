"""Where deltatalk keeps its files (platformdirs), overridable by DELTATALK_HOME for tests."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "deltatalk"


def _root(kind: str) -> Path | None:
    home = os.environ.get("DELTATALK_HOME")
    return Path(home) / kind if home else None


def data_dir() -> Path:
    return _root("data") or Path(platformdirs.user_data_dir(APP))


def models_dir() -> Path:
    d = os.environ.get("DELTATALK_MODELS_DIR")
    return Path(d) if d else data_dir() / "models"


def config_dir() -> Path:
    return _root("config") or Path(platformdirs.user_config_dir(APP))


def log_dir() -> Path:
    return _root("log") or Path(platformdirs.user_log_dir(APP))


def cache_dir() -> Path:
    """The app's cache: DELTATALK_CACHE_DIR, else DELTATALK_HOME/cache, else the platform's.

    Compiled kernels live in <cache>/numba (engine/kernel_cache.py, which does not follow
    DELTATALK_HOME so that isolated test homes share them)."""
    d = os.environ.get("DELTATALK_CACHE_DIR")
    return Path(d) if d else _root("cache") or Path(platformdirs.user_cache_dir(APP))

