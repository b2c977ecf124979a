"""Find GGUF models on this machine, read-only, without copying anything.

Sources, in order: the app's models folder, folders named in the config, the Hugging
Face cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE / $HF_HOME/hub), LM Studio
(~/.lmstudio/models, ~/.cache/lm-studio/models) and Ollama's blob store
(~/.ollama/models or $OLLAMA_MODELS: manifests name blob digests; blobs have no
.gguf suffix, so the GGUF magic is checked).

`describe(path)` reads one file's header: architecture, quantization, size, context
length, and whether this engine can run it (and if not, why).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
MAX_DEPTH = 6


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
    has_chat_template: bool = True   # False: a base model, it continues text (completion only)

    @property
    def status(self) -> str:
        return "supported" if self.supported else self.reason


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _walk_gguf(root: Path, depth: int = 0):
    """*.gguf files under root (follows symlinked files, not symlinked dirs)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                if depth < MAX_DEPTH:
                    yield from _walk_gguf(Path(e.path), depth + 1)
            elif e.name.lower().endswith(".gguf") and e.is_file():
                yield Path(e.path)
        except OSError:
            continue


def hf_cache_dir(env=os.environ, home: Path | None = None) -> Path:
    home = home or Path.home()
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    return home / ".cache" / "huggingface" / "hub"


def find_huggingface(hub: Path):
    """models--org--name/snapshots/<rev>/**.gguf (symlinks into blobs/)."""
    if not hub.is_dir():
        return
    for repo in sorted(hub.glob("models--*")):
        repo_name = repo.name[len("models--"):].replace("--", "/")
        for p in _walk_gguf(repo / "snapshots"):
            yield Candidate(p, "huggingface", f"{repo_name}/{p.name}")


def find_lmstudio(home: Path):
    for root in (home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"):
        for p in _walk_gguf(root):
            try:
                rel = p.relative_to(root)
            except ValueError:
                rel = p.name
            yield Candidate(p, "lmstudio", str(rel))


def ollama_dir(env=os.environ, home: Path | None = None) -> Path:
    if env.get("OLLAMA_MODELS"):
        return Path(env["OLLAMA_MODELS"])
    return (home or Path.home()) / ".ollama" / "models"


def find_ollama(root: Path):
    """Each manifest's model layer -> blobs/sha256-<hex>, if that blob is a GGUF."""
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for mf in sorted(manifests.rglob("*")):
        if not mf.is_file():
            continue
        try:
            doc = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        layers = doc.get("layers") if isinstance(doc, dict) else None
        for layer in layers or []:
            if not isinstance(layer, dict) or layer.get("mediaType") != "application/vnd.ollama.image.model":
                continue
            digest = str(layer.get("digest", ""))
            blob = root / "blobs" / digest.replace(":", "-")
            if blob.is_file() and is_gguf(blob):
                parts = mf.relative_to(manifests).parts  # registry/namespace/name/tag
                if len(parts) >= 2:
                    ns = "/".join(parts[1:-2]) if len(parts) > 3 else ""
                    label = (f"{ns}/" if ns and ns != "library" else "") + f"{parts[-2]}:{parts[-1]}"
                else:
                    label = mf.name
                yield Candidate(blob, "ollama", label)


def candidates(models_dir: Path, folders: list[Path] = (), *, home: Path | None = None,
               env=os.environ, huggingface=True, lmstudio=True, ollama=True) -> list[Candidate]:
    """Every GGUF file found, deduplicated by resolved path (first source wins)."""
    home = home or Path.home()
    found: list[Candidate] = []
    seen: set[str] = set()

    def add(c: Candidate):
        try:
            key = str(c.path.resolve())
        except OSError:
            key = str(c.path)
        if key not in seen:
            seen.add(key)
            found.append(c)

    for p in _walk_gguf(models_dir):
        add(Candidate(p, "models", p.name))
    for folder in folders:
        for p in _walk_gguf(folder):
            add(Candidate(p, "folder", p.name))
    if huggingface:
        for c in find_huggingface(hf_cache_dir(env, home)):
            add(c)
    if lmstudio:
        for c in find_lmstudio(home):
            add(c)
    if ollama:
        for c in find_ollama(ollama_dir(env, home)):
            add(c)
    return found


# -- reading one file ----------------------------------------------------------------------
def file_type_name(ft) -> str | None:
    try:
        import gguf

        name = gguf.LlamaFileType(int(ft)).name
    except (ImportError, ValueError, TypeError):
        return None
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _dominant_type(type_bytes: Counter) -> str:
    return type_bytes.most_common(1)[0][0] if type_bytes else "?"


def describe(c: Candidate) -> ModelEntry:
    """Read the file's header. Never raises for a bad file: the row says why instead."""
    e = ModelEntry(c.path, c.source, c.name)
    try:
        e.size = c.path.stat().st_size
    except OSError as err:
        e.reason = f"cannot read: {err.strerror}"
        return e
    try:
        from engine.errors import ModelFileError
    except ImportError:  # pragma: no cover
        ModelFileError = ValueError  # type: ignore[misc,assignment]
    try:
        from engine.gguf_file import GGUFFile
        from engine.models import SUPPORTED_ARCHITECTURES
    except ImportError:  # the engine is not importable: read the header with the gguf package
        return _describe_with_gguf_package(e)
    try:
        gf = GGUFFile(c.path)
    except ModelFileError as err:
        e.reason = getattr(err, "problem", None) or str(err)
        _fill_from_gguf_package(e)
        return e
    except Exception as err:  # noqa: BLE001  (untrusted file: any failure is a row, not a crash)
        e.reason = f"unreadable: {err}"
        return e
    try:
        meta = gf.metadata
        arch = meta.get("general.architecture")
        e.arch = arch if isinstance(arch, str) else "?"
        ctx = meta.get(f"{e.arch}.context_length")
        e.context = int(ctx) if isinstance(ctx, int) else None
        e.has_chat_template = isinstance(meta.get("tokenizer.chat_template"), str)
        ft = file_type_name(meta.get("general.file_type")) if "general.file_type" in meta else None
        counts: Counter = Counter()
        for t in gf.tensors.values():
            if len(t.shape) >= 2:
                counts[t.type_name] += t.nbytes
        e.quant = ft or _dominant_type(counts)
        if e.arch not in SUPPORTED_ARCHITECTURES:
            e.reason = f"architecture {e.arch!r} not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        else:
            e.supported = True
    finally:
        gf.close()
    return e


def _fill_from_gguf_package(e: ModelEntry):
    """Best-effort arch/quant/context for a file the engine refused (for the row)."""
    try:
        import gguf

        r = gguf.GGUFReader(str(e.path))
    except Exception:  # noqa: BLE001
        return None
    try:
        def field(key):
            f = r.fields.get(key)
            if f is None:
                return None
            v = f.contents()
            return v
        arch = field("general.architecture")
        if isinstance(arch, str):
            e.arch = arch
        ctx = field(f"{e.arch}.context_length")
        if isinstance(ctx, int):
            e.context = ctx
        ft = field("general.file_type")
        counts: Counter = Counter()
        for t in r.tensors:
            if len(t.shape) >= 2:
                counts[t.tensor_type.name] += int(t.n_bytes)
        e.quant = (file_type_name(ft) if ft is not None else None) or _dominant_type(counts)
    except Exception:  # noqa: BLE001
        pass
    return r


def _describe_with_gguf_package(e: ModelEntry) -> ModelEntry:
    if not is_gguf(e.path):
        e.reason = "not a GGUF file"
        return e
    if _fill_from_gguf_package(e) is None:
        e.reason = "unreadable GGUF header"
        return e
    try:
        from engine.models import SUPPORTED_ARCHITECTURES
    except ImportError:
        SUPPORTED_ARCHITECTURES = ("llama",)
    if e.arch not in SUPPORTED_ARCHITECTURES:
        e.reason = f"architecture {e.arch!r} not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    else:
        e.supported = True
    return e


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
