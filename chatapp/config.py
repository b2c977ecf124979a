"""The user's config file: config.json in the platformdirs config dir.

Holds the theme (persisted when the user changes it), the keymap (binding id -> keys),
extra model folders, sampling settings (defaults: chatapp.generation_defaults), the memory bandwidth figure used
by the speed overlay, and remote endpoints (OpenAI-compatible servers: URL, the name of
the environment variable holding the API key, never the key itself, and the last model). Unknown keys are kept; a broken file falls back to the defaults
(and the app says so) rather than refusing to start.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

from chatapp.generation_defaults import GENERATION_DEFAULTS
from chatapp.paths import config_dir

ASSETS = Path(__file__).resolve().parent.parent / "assets"

_FALLBACK_DEFAULTS: dict[str, object] = {
    "theme": "textual-dark",
    "model_folders": [],
    "discover": {"huggingface": True, "lmstudio": True, "ollama": True},
    "threads": None,
    "context": None,
    "speculate": "off",          # speculative decoding in the app: off | lookup | draft | mtp (same tokens, faster)
    "draft_model": None,         # speculate "draft": a small .gguf with the same vocabulary
    "memory_bandwidth_gbs": None,
    "system_prompt": "",
    "keymap": {},
    "endpoints": [],
}


def defaults() -> dict:
    """assets/default_config.json (or its copy here), with the reply defaults of chatapp.generation_defaults."""
    try:
        base = json.loads((ASSETS / "default_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        base = copy.deepcopy(_FALLBACK_DEFAULTS)
    base["max_tokens"] = GENERATION_DEFAULTS.max_tokens
    base["sampling"] = GENERATION_DEFAULTS.sampling.to_dict()
    return base


def config_path() -> Path:
    return config_dir() / "config.json"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class Config:
    def __init__(self, data: dict, path: Path, problem: str | None = None):
        self.data = data
        self.path = path
        self.problem = problem   # a one-line note when the file could not be read
        self.overrides: dict = {}  # command-line values for this run: read first, never saved

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        path = path or config_path()
        base = defaults()
        if not path.exists():
            return cls(base, path)
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(user, dict):
                raise ValueError("the top level is not an object")
        except (OSError, ValueError) as e:
            return cls(base, path, f"{path}: {e}; using the defaults")
        return cls(_merge(base, user), path)

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config-", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)

    def __getitem__(self, key):
        return self.overrides[key] if key in self.overrides else self.data[key]

    def get(self, key, default=None):
        return self.overrides[key] if key in self.overrides else self.data.get(key, default)

    def set(self, key, value, save: bool = True):
        self.data[key] = value
        if save:
            self.save()

    @property
    def keymap(self) -> dict[str, str]:
        km = self.data.get("keymap") or {}
        return {str(k): str(v) for k, v in km.items()} if isinstance(km, dict) else {}

    @property
    def model_folders(self) -> list[Path]:
        return [Path(os.path.expanduser(str(p))) for p in self.data.get("model_folders") or []]

    @property
    def bandwidth_bytes_s(self) -> float | None:
        v = self.get("memory_bandwidth_gbs")
        return float(v) * 1e9 if isinstance(v, (int, float)) and v > 0 else None

    @property
    def endpoints(self) -> list[dict]:
        """Saved remote endpoints: [{"url", "api_key_env", "model"}], malformed entries skipped."""
        out = []
        for e in self.data.get("endpoints") or []:
            if isinstance(e, str):
                e = {"url": e}
            if isinstance(e, dict) and isinstance(e.get("url"), str) and e["url"].strip():
                out.append({"url": e["url"].strip(), "api_key_env": e.get("api_key_env") or None,
                            "model": e.get("model") or None})
        return out

    def remember_endpoint(self, url: str, model: str | None = None, api_key_env: str | None = None,
                          save: bool = True):
        """Add (or update) an endpoint, most recent first."""
        rest = [e for e in self.endpoints if e["url"].rstrip("/") != url.rstrip("/")]
        self.data["endpoints"] = [{"url": url, "api_key_env": api_key_env, "model": model}] + rest
        if save:
            self.save()
