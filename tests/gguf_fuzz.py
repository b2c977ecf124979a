"""Mutated GGUF files through the loader, `describe()` and a 2-token generation, each case bounded.

One place for the fuzzing logic: `tools/fuzz_gguf.py` (the full run, >= 10,000 cases) and
`tests/engine/test_gguf_fuzz.py` (a fast subset) both use it.

- `seed_files(folder)`: valid tiny models to mutate (tests/tiny_models.py and tests/fixtures).
- `Layout.of(data)`: where every count, length, type and offset field of a valid file sits.
- `mutations(seeds, n, seed)`: n (label, bytes) cases: bit flips, truncations, count/length/
  offset/type corruption, huge array lengths (2^60), duplicate keys, overlapping tensors,
  non-finite weights.
- `run_cases(cases, ...)`: each case in a worker process (`python -m tests.gguf_fuzz --worker`)
  watched by the parent: a per-case time limit (kill -> "hang"), an RSS cap of the worker's
  baseline + file + 300 MB (kill -> "memory") and RLIMIT_DATA inside the worker as a backstop.
  Outcomes: "ok", "clean:<ErrorClass>" (a DeltatalkError), "traceback:<Type>", "hang", "memory".
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
# Valid models of other architectures and tensor types (llama.cpp's own layout), beside the
# generated tiny llamas.
FIXTURE_SEEDS = ("qwen2/tiny-q4_k_m.gguf", "qwen35/tiny-q4_k_m.gguf", "phi3/tiny-q8_0.gguf",
                 "qwen3/tiny-q4_k_m.gguf")
MEMORY_HEADROOM = 300 << 20
COMPILE_LIMIT = 600.0  # seconds for a case retried after a timeout (first-use kernel compilation)  # the acceptance bound: RSS may grow by the file + 300 MB at most


# -- seeds ----------------------------------------------------------------------------------
def seed_files(folder: Path) -> list[Path]:
    """Valid files to mutate: two generated tiny llamas (Q8_0 tied; F16 untied) and the fixtures."""
    from gguf import GGMLQuantizationType as T

    from tests.tiny_models import write_tiny_llama

    folder.mkdir(parents=True, exist_ok=True)
    seeds = [write_tiny_llama(folder / "seed-llama-q8_0.gguf"),
             write_tiny_llama(folder / "seed-llama-f16.gguf", weight_type=T.F16, embd_type=T.F32, tied=False,
                              seed=1)]
    return seeds + [FIXTURES / rel for rel in FIXTURE_SEEDS if (FIXTURES / rel).exists()]


# -- where the fields are -------------------------------------------------------------------
@dataclass
class Field:
    pos: int
    width: int  # 4 or 8
    kind: str   # "count", "length", "type", "offset", "dim", "value"


@dataclass
class KVEntry:
    start: int
    end: int
    key: str


@dataclass
class Layout:
    fields: list[Field] = field(default_factory=list)
    kvs: list[KVEntry] = field(default_factory=list)
    tensor_offsets: list[int] = field(default_factory=list)  # positions of the offset fields
    header_end: int = 0      # end of the tensor infos (before padding)
    data_start: int = 0
    alignment: int = 32

    @classmethod
    def of(cls, data: bytes) -> "Layout":
        """Walk a valid GGUF v3 file (a seed) and record each field's position."""
        lay = cls()
        pos = 8
        n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
        lay.fields += [Field(8, 8, "count"), Field(16, 8, "count")]
        pos = 24

        def string(pos):
            n = struct.unpack_from("<Q", data, pos)[0]
            lay.fields.append(Field(pos, 8, "length"))
            return pos + 8 + n, data[pos + 8: pos + 8 + n]

        def value(pos, vtype):
            if vtype == 8:
                return string(pos)[0]
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", data, pos)
                lay.fields += [Field(pos, 4, "type"), Field(pos + 4, 8, "count")]
                pos += 12
                for _ in range(count):
                    pos = value(pos, etype)
                return pos
            width = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}[vtype]
            if width >= 4 and vtype not in (6, 12):
                lay.fields.append(Field(pos, width, "value"))
            return pos + width

        for _ in range(n_kv):
            start = pos
            pos, key = string(pos)
            vtype = struct.unpack_from("<I", data, pos)[0]
            lay.fields.append(Field(pos, 4, "type"))
            pos += 4
            if key == b"general.alignment":
                lay.alignment = struct.unpack_from("<I", data, pos)[0]
            pos = value(pos, vtype)
            lay.kvs.append(KVEntry(start, pos, key.decode("utf-8", "replace")))
        for _ in range(n_tensors):
            pos, _name = string(pos)
            n_dims = struct.unpack_from("<I", data, pos)[0]
            lay.fields.append(Field(pos, 4, "count"))
            pos += 4
            for _ in range(n_dims):
                lay.fields.append(Field(pos, 8, "dim"))
                pos += 8
            lay.fields.append(Field(pos, 4, "type"))
            pos += 4
            lay.fields.append(Field(pos, 8, "offset"))
            lay.tensor_offsets.append(pos)
            pos += 8
        lay.header_end = pos
        lay.data_start = -(-pos // lay.alignment) * lay.alignment
        return lay


# -- mutations ------------------------------------------------------------------------------
EXTREMES = (0, 1, 2, 3, 7, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40,
            1 << 60, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


def _put(b: bytearray, pos: int, width: int, value: int):
    b[pos:pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _rebuild(data: bytes, lay: Layout, header: bytes) -> bytes:
    """A header replaced (n_kv etc. already patched), padded to the alignment, then the data section."""
    pad = -len(header) % lay.alignment
    return header + bytes(pad) + data[lay.data_start:]


def _duplicate_key(data, lay, rng) -> tuple[str, bytes]:
    kv = lay.kvs[int(rng.integers(len(lay.kvs)))]
    entry = data[kv.start:kv.end]
    header = bytearray(data[:lay.header_end])
    n_kv = struct.unpack_from("<Q", header, 16)[0]
    struct.pack_into("<Q", header, 16, n_kv + 1)
    at = lay.kvs[int(rng.integers(len(lay.kvs)))].end  # the copy goes after some entry
    header[at:at] = entry
    return f"duplicate-key:{kv.key}", _rebuild(data, lay, bytes(header))


def _overlap(data, lay, rng) -> tuple[str, bytes]:
    b = bytearray(data)
    i, j = rng.choice(len(lay.tensor_offsets), 2, replace=False)
    src = struct.unpack_from("<Q", data, lay.tensor_offsets[j])[0]
    shift = int(rng.integers(0, 4)) * lay.alignment  # exactly the same bytes, or a few blocks in
    struct.pack_into("<Q", b, lay.tensor_offsets[i], src + shift)
    return "overlap", bytes(b)


def _non_finite(data, lay, rng) -> tuple[str, bytes]:
    """NaN/inf bytes written over part of the data section (F32 NaN, F16 inf/NaN scales)."""
    b = bytearray(data)
    body = len(data) - lay.data_start
    pattern = [b"\xff\xff\xff\x7f", b"\x00\x00\x80\x7f", b"\x00\x7c", b"\xff\x7f"][int(rng.integers(4))]
    n = int(rng.integers(1, max(2, body // 2)))
    start = lay.data_start + int(rng.integers(0, max(1, body - n)))
    start -= (start - lay.data_start) % 2
    chunk = (pattern * (n // len(pattern) + 1))[:n]
    b[start:start + n] = chunk
    return "non-finite-weights", bytes(b)


def mutate(data: bytes, lay: Layout, rng) -> tuple[str, bytes]:
    kind = int(rng.integers(10))
    size = len(data)
    if kind == 0:  # truncation, mostly inside the header
        cut = int(rng.integers(0, lay.data_start + 64)) if rng.random() < 0.7 else int(rng.integers(0, size))
        return f"truncate@{cut}", data[:cut]
    if kind == 1:  # bit flips in the header
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(0, lay.header_end))
            b[pos] ^= 1 << int(rng.integers(8))
        return "bitflip-header", bytes(b)
    if kind == 2:  # random bytes anywhere
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 65))):
            b[int(rng.integers(0, size))] = int(rng.integers(256))
        return "bytes-anywhere", bytes(b)
    if kind in (3, 4):  # a count/length/type/offset/dim/value field set to an extreme or nearby value
        wanted = ("count", "length") if kind == 3 else ("type", "offset", "dim", "value")
        fields = [f for f in lay.fields if f.kind in wanted]
        f = fields[int(rng.integers(len(fields)))]
        old = int.from_bytes(data[f.pos:f.pos + f.width], "little")
        choice = rng.random()
        val = (EXTREMES[int(rng.integers(len(EXTREMES)))] if choice < 0.6
               else old + int(rng.integers(-3, 4)) if choice < 0.85 else int(rng.integers(0, 1 << 31)))
        b = bytearray(data)
        _put(b, f.pos, f.width, val)
        return f"{f.kind}@{f.pos}={val}", bytes(b)
    if kind == 5:  # a huge array length (the GGUFReader out-of-memory case)
        counts = [f for f in lay.fields if f.kind == "count" and f.width == 8 and f.pos > 24]
        f = counts[int(rng.integers(len(counts)))]
        val = [1 << 60, 1 << 62, 1 << 32, (1 << 64) - 1, 1 << 25][int(rng.integers(5))]
        b = bytearray(data)
        _put(b, f.pos, 8, val)
        return f"huge-count@{f.pos}={val}", bytes(b)
    if kind == 6:
        return _duplicate_key(data, lay, rng)
    if kind == 7:
        return _overlap(data, lay, rng)
    if kind == 8:
        return _non_finite(data, lay, rng)
    # a tensor's ggml type swapped for another type id (a different block size and byte count)
    types = [f for f in lay.fields if f.kind == "type" and f.pos > lay.kvs[-1].end]
    f = types[int(rng.integers(len(types)))]
    b = bytearray(data)
    _put(b, f.pos, 4, [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23, 30, 39, 1000][int(rng.integers(17))])
    return f"tensor-type@{f.pos}", bytes(b)


def mutations(seeds: list[Path], n: int, seed: int = 0):
    """n (label, bytes) cases, spread over the seeds (the generated tiny llama gets half)."""
    rng = np.random.default_rng(seed)
    datas = [p.read_bytes() for p in seeds]
    layouts = [Layout.of(d) for d in datas]
    weights = np.array([0.5] + [0.5 / (len(seeds) - 1)] * (len(seeds) - 1)) if len(seeds) > 1 else np.ones(1)
    for i in range(n):
        k = int(rng.choice(len(seeds), p=weights))
        label, variant = mutate(datas[k], layouts[k], rng)
        yield f"{seeds[k].name}:{label}", variant


# -- one case (in the worker) ---------------------------------------------------------------
def check_case(path: Path) -> str:
    """Load, describe and generate 2 tokens (one greedy, one sampled); return the outcome."""
    from chatapp.discovery import Candidate
    from chatapp.model_headers import describe
    from engine.errors import DeltatalkError
    from engine.generate import stream_generate
    from engine.loader import load_model
    from engine.sampling import make_sampler

    try:
        entry = describe(Candidate(path, "folder", path.name))
        if not isinstance(entry.reason, str):
            return "traceback:describe-returned-no-reason"
        loaded = load_model(path, n_ctx=64)
        try:
            prompt = loaded.tokenizer.encode("Hi there", add_special=True) or [0]
            for sampler in (make_sampler(0.0), make_sampler(0.8, top_k=40, top_p=0.95, min_p=0.05, seed=1)):
                cache = loaded.model.make_cache()
                for _ in stream_generate(loaded.model, loaded.tokenizer, prompt, cache, sampler, max_tokens=2):
                    pass
        finally:
            loaded.gguf.close()
        return "ok"
    except MemoryError:
        return "memory"
    except DeltatalkError as e:
        return f"clean:{type(e).__name__}"
    except Exception as e:  # noqa: BLE001  (the thing we are looking for)
        return f"traceback:{type(e).__name__}:{str(e)[:200]}\n{traceback.format_exc(limit=6)}"


def _worker():
    """Read case paths on stdin, answer one JSON line each on the real stdout."""
    import resource

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write to the answer pipe
    warm = [Path(p) for p in json.loads(sys.argv[sys.argv.index("--worker") + 1])]
    for p in warm:  # compile/load every kernel the seeds use before any case is timed
        check_case(p)
    # Backstop below the parent's RSS cap: private allocations beyond this raise MemoryError.
    data_now = _vm_kb(os.getpid(), "VmData") * 1024
    limit = data_now + int(os.environ.get("FUZZ_DATA_LIMIT", 1 << 30))
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        path = Path(line.strip())
        out.write(json.dumps({"outcome": check_case(path)}) + "\n")


def _vm_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith(key + ":"):
                    return int(ln.split()[1])
    except OSError:
        pass
    return 0


# -- the pool (in the parent) ---------------------------------------------------------------
def _child_setup(nice: int):
    """In the worker before exec: lower priority; die with the parent (no orphan keeps fuzzing)."""
    if nice:
        os.nice(nice)
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, warm: list[Path], nice: int = 0, startup_s: float = 900.0):
        cmd = [sys.executable, "-m", "tests.gguf_fuzz", "--worker", json.dumps([str(p) for p in warm])]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                     preexec_fn=lambda: _child_setup(nice))
        line = self._read(startup_s)
        if line is None or not json.loads(line).get("ready"):
            self.kill()
            raise RuntimeError("fuzz worker did not start")
        self.baseline_rss = _vm_kb(self.proc.pid, "VmRSS") * 1024

    def _read(self, timeout: float, cap_bytes: int | None = None) -> str | None | tuple:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ("hang",)
            r, _, _ = select.select([fd], [], [], min(0.02, left))
            if r:
                return fd.readline() or None
            if cap_bytes is not None and _vm_kb(self.proc.pid, "VmRSS") * 1024 > cap_bytes:
                return ("memory",)
            if self.proc.poll() is not None:
                return None

    def run(self, path: Path, time_limit: float) -> str:
        cap = self.baseline_rss + path.stat().st_size + MEMORY_HEADROOM
        self.proc.stdin.write(str(path) + "\n")
        self.proc.stdin.flush()
        got = self._read(time_limit, cap)
        if isinstance(got, tuple):
            self.kill()
            return got[0]
        if got is None:  # the worker died: a signal or a segfault
            return f"crash:exit {self.proc.wait()}"
        return json.loads(got)["outcome"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)   # outcome -> (label, details)
    seconds: float = 0.0

    def add(self, label: str, outcome: str):
        key = outcome.split("\n")[0]
        key = ":".join(key.split(":")[:2]) if key.startswith(("clean:", "traceback:", "crash:")) else key
        if key.startswith("slow("):
            key = "slow"
        self.counts[key] += 1
        self.examples.setdefault(key, (label, outcome))

    def bad(self) -> dict:
        return {k: v for k, v in self.counts.items() if k.startswith(("traceback", "crash")) or k in ("hang", "memory")}

    def summary(self) -> dict:
        c = self.counts
        return {"cases": sum(c.values()), "ok": c.get("ok", 0),
                "clean_errors": {k[6:]: v for k, v in sorted(c.items()) if k.startswith("clean:")},
                "tracebacks": sum(v for k, v in c.items() if k.startswith("traceback")),
                "crashes": sum(v for k, v in c.items() if k.startswith("crash")),
                "hangs": c.get("hang", 0), "memory_blowups": c.get("memory", 0),
                "slow_over_time_limit_but_finished": c.get("slow", 0),
                "seconds": round(self.seconds, 1)}


def run_cases(seeds: list[Path], n: int, seed: int = 0, workers: int = 2, time_limit: float = 10.0,
              nice: int = 0, progress=None, keep_dir: Path | None = None) -> Report:
    """Fuzz n mutated files over `workers` worker processes; return the counts."""
    report = Report()
    lock = threading.Lock()
    cases = iter(enumerate(mutations(seeds, n, seed)))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gguf-fuzz-") as tmp:
        def loop(wid: int):
            w = Worker(seeds, nice)
            try:
                while True:
                    with lock:
                        item = next(cases, None)
                    if item is None:
                        return
                    i, (label, variant) = item
                    path = Path(tmp) / f"w{wid}.gguf"
                    path.write_bytes(variant)
                    outcome = w.run(path, time_limit)
                    if outcome == "hang":
                        # numba compiles a kernel on its first use (a mutated tensor type the seeds
                        # lack) and a kill mid-compile caches nothing: give it one long try; if it
                        # finishes it is counted apart as "slow" (compilation, or a slow path:
                        # look at the examples), otherwise as a hang
                        w = Worker(seeds, nice)
                        again = w.run(path, COMPILE_LIMIT)
                        outcome = "hang" if again in ("hang", "memory") else f"slow({again})"
                        if again == "hang" or not w.alive():
                            w.kill()
                            w = Worker(seeds, nice)
                    if outcome != "ok" and not outcome.startswith("clean:") and keep_dir is not None:
                        keep_dir.mkdir(parents=True, exist_ok=True)
                        (keep_dir / f"case{i}.gguf").write_bytes(variant)
                    with lock:
                        report.add(f"#{i} {label}", outcome)
                        done = sum(report.counts.values())
                    if progress and done % 100 == 0:
                        progress(done, report)
                    if not w.alive():
                        w = Worker(seeds, nice)
            finally:
                w.kill()

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    report.seconds = time.monotonic() - t0
    return report


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
