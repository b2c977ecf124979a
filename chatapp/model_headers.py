"""Read the GGUF headers of found models: what each is and whether this engine runs it.

`describe(candidate)` reads one file's header with the engine's own bounds-checked parser
(engine/gguf_file.py): architecture, quantization, size, context length, and whether this
engine can run it (and if not, why, in plain words). `describe_all` does that for many files
in a separate worker process, so a hostile file costs a bounded time (FILE_SECONDS, then the
worker is killed) and bounded memory (the file's size + FILE_EXTRA_BYTES of address space).
`scan` = `chatapp.discovery.candidates` + `describe_all` under one deadline.
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from chatapp.discovery import GGUF_MAGIC, Candidate, ModelEntry, candidates, past_deadline

SCAN_SECONDS = 30.0               # the whole scan: walking the folders + reading the headers
FILE_SECONDS = 6.0                # one file's header (a 248K-token vocabulary takes ~1.5 s)
FILE_EXTRA_BYTES = 300 << 20      # memory the header reader may use beyond mapping the file
WORKER_START_SECONDS = 60.0       # the worker imports the GGUF reader (no numba) before its first file


# -- reading one file ----------------------------------------------------------------------
def file_type_name(ft) -> str | None:
    import gguf

    try:
        name = gguf.LlamaFileType(int(ft)).name
    except (ValueError, TypeError, OverflowError):
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
            [sys.executable, "-c", "from chatapp.model_headers import worker_main; worker_main()"],
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
            if past_deadline(deadline):
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


def scan(models_dir: Path, folders: Sequence[Path] = (), *, seconds: float = SCAN_SECONDS,
         cancel: threading.Event | None = None, **sources) -> Iterator[ModelEntry]:
    """candidates() + describe_all() within one time box."""
    deadline = time.monotonic() + seconds
    found = candidates(models_dir, folders, deadline=deadline, **sources)
    yield from describe_all(found, deadline=deadline, cancel=cancel)
