"""Find GGUF models on this machine, read-only, without copying anything.

Sources, in order: the app's models folder, folders named in the config, the Hugging
Face cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE / $HF_HOME/hub), LM Studio
(~/.lmstudio/models, ~/.cache/lm-studio/models) and Ollama's blob store
(~/.ollama/models or $OLLAMA_MODELS: manifests name blob digests; blobs have no
.gguf suffix, so the GGUF magic is checked).

`chatapp.model_headers` reads what is found (`describe`, `describe_all`, `scan`).

Every file here is untrusted: only regular files are read (FIFOs, devices and sockets would
block or never end), dangling and looping symlinks are skipped, manifests are read up to
MAX_MANIFEST_BYTES, and the walk stops at its deadline.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
MAX_DEPTH = 6
MAX_MANIFEST_BYTES = 1 << 20      # an Ollama manifest is a few hundred bytes


@dataclass
class Candidate:
    path: Path
    source: str          # "models", "folder", "huggingface", "lmstudio", "ollama"
    name: str            # display name (Ollama: library/name:tag)


@dataclass
class ModelEntry:
    path: Path
    source: str
    name: str
    arch: str = "?"
    quant: str = "?"
    size: int = 0
    context: int | None = None
    supported: bool = False
    reason: str = ""     # why not supported (empty when supported)
    readable: bool = False  # a GGUF header that parses (supported or not); broken files are not counted
    has_chat_template: bool = True   # False: a base model, it continues text (completion only)

    @property
    def status(self) -> str:
        return "supported" if self.supported else self.reason


def is_regular_file(path: Path) -> bool:
    """A regular file (after symlinks); False for dangling or looping links, FIFOs, devices, sockets."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_gguf(path: Path) -> bool:
    if not is_regular_file(path):
        return False
    try:
        # O_NONBLOCK: if the file was swapped for a FIFO since the check, open() must not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return os.read(fd, 4) == GGUF_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def past_deadline(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _walk(root: Path, depth: int, deadline: float | None, want):
    """Regular files under root that `want(name)` (follows symlinked files, not symlinked dirs)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if past_deadline(deadline):
            return
        if e.name.startswith("."):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                if depth < MAX_DEPTH:
                    yield from _walk(Path(e.path), depth + 1, deadline, want)
            elif want(e.name) and is_regular_file(Path(e.path)):
                yield Path(e.path)
        except OSError:
            continue


def _walk_gguf(root: Path, deadline: float | None = None):
    return _walk(root, 0, deadline, lambda name: name.lower().endswith(".gguf"))


def hf_cache_dir(env=os.environ, home: Path | None = None) -> Path:
    home = home or Path.home()
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    return home / ".cache" / "huggingface" / "hub"


def find_huggingface(hub: Path, deadline: float | None = None):
    """models--org--name/snapshots/<rev>/**.gguf (symlinks into blobs/)."""
    if not hub.is_dir():
        return
    for repo in sorted(hub.glob("models--*")):
        if past_deadline(deadline):
            return
        repo_name = repo.name[len("models--"):].replace("--", "/")
        for p in _walk_gguf(repo / "snapshots", deadline):
            yield Candidate(p, "huggingface", f"{repo_name}/{p.name}")


def find_lmstudio(home: Path, deadline: float | None = None):
    for root in (home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"):
        for p in _walk_gguf(root, deadline):
            try:
                rel = p.relative_to(root)
            except ValueError:
                rel = p.name
            yield Candidate(p, "lmstudio", str(rel))


def ollama_dir(env=os.environ, home: Path | None = None) -> Path:
    if env.get("OLLAMA_MODELS"):
        return Path(env["OLLAMA_MODELS"])
    return (home or Path.home()) / ".ollama" / "models"


def _read_manifest(path: Path):
    """An Ollama manifest's JSON, or None (not a regular file, over MAX_MANIFEST_BYTES, not JSON)."""
    if not is_regular_file(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_MANIFEST_BYTES:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def find_ollama(root: Path, deadline: float | None = None):
    """Each manifest's model layer -> blobs/sha256-<hex>, if that blob is a GGUF."""
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for mf in _walk(manifests, 0, deadline, lambda name: True):
        doc = _read_manifest(mf)
        if doc is None:
            continue
        layers = doc.get("layers") if isinstance(doc, dict) else None
        for layer in layers or []:
            if not isinstance(layer, dict) or layer.get("mediaType") != "application/vnd.ollama.image.model":
                continue
            digest = str(layer.get("digest", ""))
            if not digest or "/" in digest or "\0" in digest or digest.startswith("."):
                continue  # a digest names a file in blobs/, nothing else
            blob = root / "blobs" / digest.replace(":", "-")
            if is_gguf(blob):
                parts = mf.relative_to(manifests).parts  # registry/namespace/name/tag
                if len(parts) >= 2:
                    ns = "/".join(parts[1:-2]) if len(parts) > 3 else ""
                    label = (f"{ns}/" if ns and ns != "library" else "") + f"{parts[-2]}:{parts[-1]}"
                else:
                    label = mf.name
                yield Candidate(blob, "ollama", label)


def candidates(models_dir: Path, folders: Sequence[Path] = (), *, home: Path | None = None,
               env=os.environ, huggingface=True, lmstudio=True, ollama=True,
               deadline: float | None = None) -> list[Candidate]:
    """Every GGUF file found, deduplicated by resolved path (first source wins).

    `deadline` (time.monotonic()): the walk stops there and returns what it found so far.
    """
    home = home or Path.home()
    found: list[Candidate] = []
    seen: set[str] = set()

    def add(c: Candidate):
        try:
            key = str(c.path.resolve())
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop on older Pythons
            key = str(c.path)
        if key not in seen:
            seen.add(key)
            found.append(c)

    for p in _walk_gguf(models_dir, deadline):
        add(Candidate(p, "models", p.name))
    for folder in folders:
        for p in _walk_gguf(Path(folder), deadline):
            add(Candidate(p, "folder", p.name))
    if huggingface:
        for c in find_huggingface(hf_cache_dir(env, home), deadline):
            add(c)
    if lmstudio:
        for c in find_lmstudio(home, deadline):
            add(c)
    if ollama:
        for c in find_ollama(ollama_dir(env, home), deadline):
            add(c)
    return found


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
