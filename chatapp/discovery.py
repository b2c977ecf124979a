"""Find GGUF models on this machine, read-only, without copying anything.

Sources, in order: the app's models folder, folders named in the config, the Hugging
Face cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE / $HF_HOME/hub), LM Studio
(~/.lmstudio/models, ~/.cache/lm-studio/models) and Ollama's blob store
(~/.ollama/models or $OLLAMA_MODELS: manifests name blob digests; blobs have no
.gguf suffix, so the GGUF magic is checked).

`describe(candidate)` reads one file's header with the engine's own bounds-checked parser
(engine/gguf_file.py): architecture, quantization, size, context length, and whether this
engine can run it (and if not, why, in plain words). `describe_all` does that for many files
in a separate worker process, so a hostile file costs a bounded time (FILE_SECONDS, then the
worker is killed) and bounded memory (the file's size + FILE_EXTRA_BYTES of address space).

Every file here is untrusted: only regular files are read (FIFOs, devices and sockets would
block or never end), dangling and looping symlinks are skipped, manifests are read up to
MAX_MANIFEST_BYTES, and the walk stops at its deadline.
"""

from __future__ import annotations

import json
import os
import resource
import select
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
MAX_DEPTH = 6
MAX_MANIFEST_BYTES = 1 << 20      # an Ollama manifest is a few hundred bytes
SCAN_SECONDS = 30.0               # the whole scan: walking the folders + reading the headers
FILE_SECONDS = 6.0                # one file's header (a 248K-token vocabulary takes ~1.5 s)
FILE_EXTRA_BYTES = 300 << 20      # memory the header reader may use beyond mapping the file
WORKER_START_SECONDS = 60.0       # the worker imports the GGUF reader (no numba) before its first file


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


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _walk(root: Path, depth: int, deadline: float | None, want):
    """Regular files under root that `want(name)` (follows symlinked files, not symlinked dirs)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if _past(deadline):
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
        if _past(deadline):
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


def candidates(models_dir: Path, folders: list[Path] = (), *, home: Path | None = None,
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


# -- reading one file ----------------------------------------------------------------------
def file_type_name(ft) -> str | None:
    try:
        import gguf

        name = gguf.LlamaFileType(int(ft)).name
    except (ImportError, ValueError, TypeError, OverflowError):
        return None
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _dominant_type(type_bytes: Counter) -> str:
    return type_bytes.most_common(1)[0][0] if type_bytes else "?"


def _first_bytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def _precheck(path: Path) -> str | None:
    """Why the file cannot be a GGUF at all, from its type and first bytes (None: go on)."""
    try:
        st = os.stat(path)
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    try:
        head = os.read(fd, 24)
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    finally:
        os.close(fd)
    if not GGUF_MAGIC.startswith(head[:4]):
        return f"not a GGUF file (starts with {_first_bytes(head[:4])})"
    if len(head) < 24:
        return f"truncated header ({len(head)} bytes, a GGUF header needs 24)"
    return None


def _plain(problem: str) -> str:
    """The parser's problem in the picker's words (its own wording is already one plain line)."""
    if problem.startswith("truncated: "):
        return "truncated file: " + problem[len("truncated: "):]
    return problem


def describe(c: Candidate) -> ModelEntry:
    """Read the file's header (in this process). Never raises for a bad file: the row says why."""
    from engine.errors import ModelFileError
    from engine.gguf_file import GGUFFile
    from engine.architectures import SUPPORTED_ARCHITECTURES

    e = ModelEntry(c.path, c.source, c.name)
    try:
        e.size = os.stat(c.path).st_size
    except OSError as err:
        e.reason = f"cannot read: {err.strerror or err}"
        return e
    e.reason = _precheck(c.path) or ""
    if e.reason:
        return e
    try:
        gf = GGUFFile(c.path)
    except ModelFileError as err:
        e.reason = _plain(err.problem) + (f" (supported: {err.supported})" if err.supported else "")
        return e
    except MemoryError:
        e.reason = "unreadable: its header needs too much memory"
        return e
    except Exception as err:  # noqa: BLE001  (untrusted file: any failure is a row, not a crash)
        e.reason = f"unreadable: {type(err).__name__}"
        return e
    try:
        e.readable = True
        meta = gf.metadata
        arch = meta.get("general.architecture")
        e.arch = arch if isinstance(arch, str) else "?"
        ctx = meta.get(f"{e.arch}.context_length")
        e.context = int(ctx) if isinstance(ctx, int) and ctx > 0 else None
        e.has_chat_template = isinstance(meta.get("tokenizer.chat_template"), str)
        ft = file_type_name(meta.get("general.file_type")) if "general.file_type" in meta else None
        counts: Counter = Counter()
        for t in gf.tensors.values():
            if len(t.shape) >= 2:
                counts[t.type_name] += t.nbytes
        e.quant = ft or _dominant_type(counts)
        if not isinstance(arch, str):
            e.reason = "no architecture in the header (general.architecture is missing)"
        elif e.arch not in SUPPORTED_ARCHITECTURES:
            e.reason = f"architecture {e.arch[:40]!r} not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        else:
            e.supported = True
    finally:
        gf.close()
    return e


# -- many files, in a worker process ---------------------------------------------------------
def _entry_json(e: ModelEntry) -> str:
    d = asdict(e)
    d["path"] = str(e.path)
    return json.dumps(d)


def _entry_from_json(line: bytes) -> ModelEntry:
    d = json.loads(line)
    d["path"] = Path(d["path"])
    return ModelEntry(**d)


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker_main():
    """The header reader process: one JSON candidate per stdin line -> one JSON entry per stdout line.

    Before each file its address space is limited to what it has now + the file (mapped) +
    FILE_EXTRA_BYTES, so a header that makes the parser allocate fails with MemoryError here.
    """
    import engine.gguf_file  # noqa: F401  (import before measuring the base address space)

    out = sys.stdout.buffer
    out.write(b'"ready"\n')
    out.flush()
    base = _vm_size()
    for line in sys.stdin.buffer:
        req = json.loads(line)
        c = Candidate(Path(req["path"]), req["source"], req["name"])
        try:
            size = os.stat(c.path).st_size
        except OSError:
            size = 0
        if base:
            limit = base + size + FILE_EXTRA_BYTES
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        try:
            e = describe(c)
        except MemoryError:
            e = ModelEntry(c.path, c.source, c.name, size=size, reason="unreadable: its header needs too much memory")
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        out.write(_entry_json(e).encode() + b"\n")
        out.flush()


class _Worker:
    """The running header reader: send a candidate, wait for its row with a timeout."""

    def __init__(self):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from chatapp.discovery import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True)
        self.buf = b""

    def read_line(self, timeout: float, cancel: threading.Event | None) -> bytes | None:
        """One line, or None on timeout, cancel or the worker's end."""
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or (cancel is not None and cancel.is_set()):
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 0.1))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def ask(self, c: Candidate, timeout: float, cancel: threading.Event | None) -> bytes | None:
        try:
            self.proc.stdin.write(json.dumps({"path": str(c.path), "source": c.source, "name": c.name}).encode()
                                  + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        return self.read_line(timeout, cancel)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def describe_all(found: Iterable[Candidate], *, deadline: float | None = None,
                 file_seconds: float = FILE_SECONDS,
                 cancel: threading.Event | None = None) -> Iterator[ModelEntry]:
    """One ModelEntry per candidate, in order, read by a worker process.

    A file whose header takes longer than `file_seconds` (or more memory than its size +
    FILE_EXTRA_BYTES) gets a row saying so and the worker is replaced; once `deadline`
    (time.monotonic()) has passed, the remaining files get a "not checked" row. `cancel`
    stops at once (the generator ends; closing it early also stops the worker).
    """
    worker: _Worker | None = None
    try:
        for c in found:
            if cancel is not None and cancel.is_set():
                return
            if _past(deadline):
                yield _row_without_header(c, "not checked: the scan's time limit was reached")
                continue
            if worker is None:
                worker = _Worker()
                if worker.read_line(WORKER_START_SECONDS, cancel) != b'"ready"':
                    worker.stop()
                    worker = None
                    if cancel is not None and cancel.is_set():
                        return
                    yield _row_without_header(c, "not checked: the header reader did not start")
                    continue
            budget = file_seconds if deadline is None else max(0.0, min(file_seconds, deadline - time.monotonic()))
            line = worker.ask(c, budget, cancel)
            if line is not None:
                try:
                    yield _entry_from_json(line)
                    continue
                except (ValueError, TypeError, KeyError):
                    pass
            if cancel is not None and cancel.is_set():
                return
            died = worker.proc.poll() is not None
            worker.stop()
            worker = None
            why = ("unreadable: reading its header failed" if died else
                   f"unreadable: reading its header took over {budget:g} s")
            yield _row_without_header(c, why)
    finally:
        if worker is not None:
            worker.stop()


def _row_without_header(c: Candidate, reason: str) -> ModelEntry:
    try:
        size = os.stat(c.path).st_size
    except OSError:
        size = 0
    return ModelEntry(c.path, c.source, c.name, size=size, reason=reason)


def scan(models_dir: Path, folders: list[Path] = (), *, seconds: float = SCAN_SECONDS,
         cancel: threading.Event | None = None, **sources) -> Iterator[ModelEntry]:
    """candidates() + describe_all() within one time box."""
    deadline = time.monotonic() + seconds
    found = candidates(models_dir, folders, deadline=deadline, **sources)
    yield from describe_all(found, deadline=deadline, cancel=cancel)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
