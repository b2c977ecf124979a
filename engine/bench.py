"""The benchmark behind `deltatalk bench`: prefill (ppN) and decode (tgN) tok/s.

Runs are interleaved (pp128, pp512, tg128, then again) and medians are reported, since
these machines are noisy. Prompts are random token ids, as llama-bench uses.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numba
import numpy as np

from engine import runtime
from engine.jit import JIT_PAR
from engine.generate import PREFILL_CHUNK


@numba.njit(**JIT_PAR)
def _sum_rows(a):
    """Read every byte of a (rows, n) float32 array once, split across threads."""
    partial = np.zeros(a.shape[0], dtype=np.float32)
    for r in numba.prange(a.shape[0]):
        s = np.float32(0.0)
        for i in range(a.shape[1]):
            s += a[r, i]
        partial[r] = s
    return partial.sum()


def measure_bandwidth(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s (median), with the threads currently set: the decode bound."""
    a = np.ones((n_bytes // 4 // 65536, 65536), dtype=np.float32)
    _sum_rows(a)  # compile / fault the pages in
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _sum_rows(a)
        times.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(times)


def time_prefill(model, n_tokens: int, rng) -> float:
    cache = model.make_cache()
    tokens = rng.integers(0, model.n_vocab, size=n_tokens)
    t = time.perf_counter()
    for start in range(0, n_tokens, PREFILL_CHUNK * 2):
        part = tokens[start : start + PREFILL_CHUNK * 2]
        model.forward(part, cache, logits="last" if start + len(part) >= n_tokens else "none")
    return n_tokens / (time.perf_counter() - t)


def time_decode(model, n_tokens: int, rng) -> float:
    cache = model.make_cache()
    token = int(rng.integers(0, model.n_vocab))
    model.forward([token], cache, logits="last")  # position 0 is not timed
    t = time.perf_counter()
    for _ in range(n_tokens):
        logits = model.forward([token], cache, logits="last")
        token = int(np.argmax(logits[-1]))
    return n_tokens / (time.perf_counter() - t)


def run_bench(model, pp=(128, 512), tg: int = 128, repeats: int = 5,
              progress: Callable[[str], None] | None = None, bandwidth: bool = True) -> dict:
    bw = measure_bandwidth() if bandwidth else None
    rng = np.random.default_rng(0)
    pp = [n for n in pp if n < model.n_ctx]
    samples: dict[str, list[float]] = {f"pp{n}": [] for n in pp}
    if tg:
        samples[f"tg{tg}"] = []
    for r in range(repeats):
        for n in pp:
            samples[f"pp{n}"].append(time_prefill(model, n, rng))
        if tg:
            samples[f"tg{tg}"].append(time_decode(model, tg, rng))
        if progress:
            progress(f"run {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()))
    return {
        "results": {k: {"median_tps": statistics.median(v), "runs": v} for k, v in samples.items()},
        "threads": numba.get_num_threads(),
        "threading_layer": runtime.threading_layer(),
        "cpu_features": runtime.cpu_features(),
        "weight_bytes": getattr(model, "weight_bytes", None),
        "bandwidth_bytes_per_s": bw,
        # decode reads every weight once per token: tok/s <= bandwidth / weight bytes
        "decode_bound_tps": bw / model.weight_bytes if bw and getattr(model, "weight_bytes", None) else None,
        "peak_rss_bytes": runtime.peak_rss_bytes(),
        "repeats": repeats,
    }
