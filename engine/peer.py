"""llama.cpp beside us: the same file, threads and prompt lengths, for `deltatalk bench --peer`.

llama.cpp runs through llama-cpp-python (the optional `peer` extra, or any Python that has
it, named by --peer-python) in its own process, so its threads never fight ours, and it
stays loaded between runs: the benchmark sends it one measurement at a time, interleaved
with our own runs, and reads back tok/s.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

# The peer process: load once, then answer {"pp": N, "depth": D} / {"tg": N, "depth": D} lines with tok/s.
PEER_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def peak():  # VmHWM: ru_maxrss would also count the RSS of our process when it forked this one
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = rss()
llm = Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
            logits_all=False, verbose=False)
rng = np.random.default_rng(0)
n_vocab = llm.n_vocab()
try:
    info = __import__("llama_cpp").llama_print_system_info().decode(errors="replace")
except Exception:
    info = ""
print(json.dumps({"ready": True, "version": __import__("llama_cpp").__version__, "system_info": info}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    llm.reset()
    llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    if cmd.get("depth"):   # context already there, as deep in a chat (not timed)
        llm.eval(rng.integers(0, n_vocab, size=cmd["depth"]).tolist())
    if "pp" in cmd:
        toks = rng.integers(0, n_vocab, size=cmd["pp"]).tolist()
        t = time.perf_counter()
        llm.eval(toks)
        dt = time.perf_counter() - t
        print(json.dumps({"tps": cmd["pp"] / dt, "peak_rss": peak(), "base_rss": base}), flush=True)
    else:
        tok = int(rng.integers(0, n_vocab))
        llm.eval([tok])  # the first position is not timed, as ours
        t = time.perf_counter()
        for _ in range(cmd["tg"]):
            llm.eval([tok])
        dt = time.perf_counter() - t
        print(json.dumps({"tps": cmd["tg"] / dt, "peak_rss": peak(), "base_rss": base}), flush=True)
"""


class PeerError(RuntimeError):
    pass


# The x86 instruction sets in llama.cpp's system info worth naming beside its figures: a build
# with -march=native on one machine and a portable one differ by these.
SHOWN_FEATURES = ("AVX2", "FMA", "F16C", "AVX_VNNI", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8")


def build_features(system_info: str) -> list[str]:
    """The SHOWN_FEATURES that llama.cpp's `llama_print_system_info()` reports on (`NAME = 1`)."""
    # "CPU : SSE3 = 1 | AVX = 1 | ...": the backend's name stands before the first feature
    on = {part.split("=")[0].split(":")[-1].strip() for part in system_info.split("|")
          if part.split("=")[-1].strip() == "1"}
    return [f for f in SHOWN_FEATURES if f in on]


def _how_it_ended(returncode: int | None) -> str:
    if returncode is None:
        return "it stopped answering"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class LlamaCppPeer:
    def __init__(self, model_path: str, threads: int, n_ctx: int = 1024, python: str | None = None):
        self.python = python or sys.executable
        self.proc = subprocess.Popen([self.python, "-c", PEER_SCRIPT, str(model_path), str(threads), str(n_ctx)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        stdin, stdout, stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        assert stdin is not None and stdout is not None and stderr is not None   # PIPE: always set
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr
        line = self._stdout.readline()
        if not line:
            err = self._stderr.read()[-2000:]
            hint = ("llama-cpp-python is not importable there: pip install -e '.[peer]' (builds llama.cpp, "
                    "~10 min) or pass --peer-python PATH") if "No module named 'llama_cpp'" in err else err
            raise PeerError(f"llama.cpp peer did not start ({self.python}): {hint}")
        ready = json.loads(line)
        self.version = ready.get("version")
        self.features = build_features(ready.get("system_info", ""))
        # its process's peak RSS and the RSS before it loaded the model (Linux; else None)
        self.peak_rss_bytes: int | None = None
        self.baseline_rss_bytes: int | None = None

    def _ask(self, cmd: dict) -> float:
        self._stdin.write(json.dumps(cmd) + "\n")
        self._stdin.flush()
        line = self._stdout.readline()
        if not line:
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            err = self._stderr.read()[-2000:].strip()
            what = f"{cmd['pp']}-token prefill" if "pp" in cmd else f"{cmd.get('tg')}-token decode"
            msg = f"llama.cpp stopped during its {what} ({_how_it_ended(code)})" + (f": {err}" if err else "")
            if "AMX_INT8" in self.features:
                # seen on a 2-vCPU Xeon VM: the AMX build segfaulted on any batch of 8+ tokens
                msg += ("; this llama.cpp build uses AMX, which crashes on some virtual machines: rebuild "
                        "it without, e.g. CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON "
                        "-DGGML_F16C=ON -DGGML_AVX512=ON' pip install --no-cache-dir --force-reinstall "
                        "llama-cpp-python")
            raise PeerError(msg)
        reply = json.loads(line)
        self.peak_rss_bytes = reply.get("peak_rss", self.peak_rss_bytes)
        self.baseline_rss_bytes = reply.get("base_rss", self.baseline_rss_bytes)
        return float(reply["tps"])

    def prefill_tps(self, n: int, depth: int = 0) -> float:
        return self._ask({"pp": n, "depth": depth})

    def decode_tps(self, n: int, depth: int = 0) -> float:
        return self._ask({"tg": n, "depth": depth})

    def close(self):
        if self.proc.poll() is None:
            self._stdin.close()
            self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
