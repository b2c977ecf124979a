"""The benchmark behind `deltatalk bench`: prefill (ppN) and decode (tgN) tok/s.

Runs are interleaved (pp128, pp512, tg128, then again) and medians are reported, since
these machines are noisy. Prompts are random token ids, as llama-bench uses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from engine import cpu_target, runtime, threads
from engine.cache import cache_bytes
from engine.generate import PREFILL_CHUNK, prefill


def _cache_at_depth(model, rng, depth: int) -> list:
    """A new cache holding `depth` random tokens of context (prefilled, not timed)."""
    cache = model.make_cache()
    if depth:
        prefill(model, cache, rng.integers(0, model.n_vocab, size=depth).tolist(), chunk=PREFILL_CHUNK)
    return cache


def time_prefill(model, n_tokens: int, rng, depth: int = 0, cache_sizes: list | None = None) -> float:
    """Prefill tok/s of n_tokens random ids; with `depth`, after that many tokens already in
    the context (as a new turn's prompt deep in a chat)."""
    cache = _cache_at_depth(model, rng, depth)
    tokens = rng.integers(0, model.n_vocab, size=n_tokens)
    t = time.perf_counter()
    prefill(model, cache, tokens, chunk=PREFILL_CHUNK)   # as a reply feeds its prompt
    tps = n_tokens / (time.perf_counter() - t)
    if cache_sizes is not None:
        cache_sizes.append(sum(cache_bytes(cache).values()))
    return tps


def time_decode(model, n_tokens: int, rng, depth: int = 0, cache_sizes: list | None = None) -> float:
    """Greedy decode tok/s, with the thread policy adapting per step as in a reply; with
    `depth`, after that many tokens already in the context (as deep in a chat: attention
    then reads depth positions per layer and token)."""
    governor = threads.governor()
    cache = _cache_at_depth(model, rng, depth)
    token = int(rng.integers(0, model.n_vocab))
    governor.before_work()
    model.forward([token], cache, logits="last")  # position 0 is not timed
    t = time.perf_counter()
    for _ in range(n_tokens):
        t_step = time.perf_counter()
        logits = model.forward([token], cache, logits="last")
        token = int(np.argmax(logits[-1]))
        governor.after_step(time.perf_counter() - t_step)
    tps = n_tokens / (time.perf_counter() - t)
    if cache_sizes is not None:
        cache_sizes.append(sum(cache_bytes(cache).values()))
    return tps


def bench_key(kind: str, n: int, depth: int = 0) -> str:
    """A test's name, as llama-bench's: pp512, tg128, or tg128@d4096 after 4096 tokens of context."""
    return f"{kind}{n}" + (f"@d{depth}" if depth else "")


def run_bench(model, pp=(128, 512), tg: int = 128, repeats: int = 5,
              progress: Callable[[str], None] | None = None, bandwidth: bool = True, peer=None,
              depth: int = 0, pages=None) -> dict:
    """Medians of interleaved runs; with `peer` (an engine.peer.LlamaCppPeer) each of our runs
    is followed by the same run in llama.cpp, and the ratios ours / llama.cpp are reported.
    `depth`: prefill and decode after that many tokens of context (llama-bench's -d).
    `pages`: where the weights are mapped (GGUFFile.pages): the probe reads the same page size."""
    rng = np.random.default_rng(0)
    pp = [n for n in pp if depth + n < model.n_ctx]
    runs = [("pp", n) for n in pp] + ([("tg", tg)] if tg else [])
    tests = [(bench_key(kind, n, depth), kind, n) for kind, n in runs]
    samples: dict[str, list[float]] = {k: [] for k, _, _ in tests}
    peer_samples: dict[str, list[float]] = {k: [] for k, _, _ in tests}
    cache_sizes: list[int] = []   # KV + recurrent state bytes after each run
    # the read bandwidth is measured after every round too (median): it drifts with the
    # machine's load like the runs do; the probe's buffer is kept out of the peak RSS
    bw_samples: list[float] = []
    peak_rss = runtime.peak_rss_bytes()   # loading and warm-up count too
    probe_each_round = bandwidth and runtime.reset_peak_rss()
    huge = pages is not None and pages.on_huge_pages
    for r in range(repeats):
        for key, kind, n in tests:
            samples[key].append(time_prefill(model, n, rng, depth, cache_sizes) if kind == "pp"
                                else time_decode(model, n, rng, depth, cache_sizes))
            if peer is not None:
                peer_samples[key].append(peer.prefill_tps(n, depth) if kind == "pp" else peer.decode_tps(n, depth))
        if probe_each_round:
            peak_rss = max(peak_rss, runtime.peak_rss_bytes())
            bw_samples.append(runtime.measure_bandwidth(repeats=3, huge_pages=huge))
            runtime.reset_peak_rss()
        if progress:
            line = ", ".join(f"{k} {v[-1]:.1f}" + (f" (llama.cpp {peer_samples[k][-1]:.1f})" if peer else "")
                             for k, v in samples.items())
            progress(f"run {r + 1}/{repeats}: {line}")
    out_peer: dict[str, Any] = {}
    if peer is not None:
        built = "; " + " ".join(peer.features) if getattr(peer, "features", None) else ""
        out_peer = {"peer": {"engine": f"llama.cpp (llama-cpp-python {peer.version}{built})",
                             "results": {k: {"median_tps": statistics.median(v), "runs": v}
                                         for k, v in peer_samples.items()},
                             "peak_rss_bytes": peer.peak_rss_bytes,
                             "baseline_rss_bytes": peer.baseline_rss_bytes}}
        # the median of the per-pair ratios: each pair ran back to back, so a slow spell of the
        # (shared, noisy) machine hits both sides of a pair instead of skewing one median
        ratio = {k: statistics.median(a / b for a, b in zip(samples[k], peer_samples[k])) for k in samples}
        out_peer["ratios"] = ratio
        out_peer["decode_ratio"] = ratio.get(bench_key("tg", tg, depth))
        big_pp = bench_key("pp", max(pp), depth) if pp else None
        out_peer["prefill_ratio"] = ratio.get(big_pp) if big_pp else None
    peak_rss = max(peak_rss, runtime.peak_rss_bytes())   # (without a reset: before the probe's buffer)
    if bandwidth and not bw_samples:
        bw_samples.append(runtime.measure_bandwidth(huge_pages=huge))
    bw = statistics.median(bw_samples) if bw_samples else None
    return {
        **out_peer,
        "results": {k: {"median_tps": statistics.median(v), "runs": v} for k, v in samples.items()},
        "threads": numba.get_num_threads(),
        "thread_policy": threads.governor().summary(),
        "threading_layer": runtime.threading_layer(),
        "cpu_features": runtime.cpu_features(),
        "kernel_family": runtime.kernel_family(),
        "cpu_target": cpu_target.describe(),
        "weight_bytes": model.weight_bytes,
        "bandwidth_bytes_per_s": bw,
        "bandwidth_runs": bw_samples,
        "bandwidth_huge_pages": huge,
        "weight_pages": pages.describe() if pages is not None else None,
        # decode reads every weight once per token: tok/s <= bandwidth / weight bytes
        "decode_bound_tps": bw / model.weight_bytes if bw and model.weight_bytes else None,
        "peak_rss_bytes": peak_rss,
        # the largest KV cache + recurrent state the runs held (the memory bound allows for it)
        "kv_state_bytes": max(cache_sizes, default=0),
        "repeats": repeats,
        "depth": depth,
    }


# A CPU-bound process, as a build or a browser tab: its own session, so the scheduler's
# autogroups share the CPU between it and us (nice would not matter).
BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def busy_processes(n: int, python: str | None = None):
    """Run n CPU-bound processes, each in its own session, for the duration of the block; they
    are killed (their whole session) on the way out, whatever happens in the block."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([python or sys.executable, "-c", BUSY_LOOP], start_new_session=True,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()


# Same prompts for plain and speculative decoding: a function the reply repeats with a docstring
# added (what drafting from the conversation is for), one the default model's reply rewrites
# instead (its greedy reply keeps the name and little else), and free prose (nothing to copy:
# lookup must not slow it down). Of seven short functions tried with SmolLM2-135M, the
# default model repeats two whole (binary search, a prime test) and rewrites the rest.
SPECULATE_PROMPTS = {
    "code": "Repeat this function with a docstring:\n\n```python\n"
            "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n"
            "        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n"
            "        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n"
            "    return -1\n```",
    "rewrite": "Repeat this function with a docstring:\n\n```python\n"
               "def moving_average(values, window):\n    result = []\n    total = 0.0\n"
               "    for i, v in enumerate(values):\n        total += v\n        if i >= window:\n"
               "            total -= values[i - window]\n        if i >= window - 1:\n"
               "            result.append(total / window)\n    return result\n```",
    "prose": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run_speculate_bench(loaded, make_speculator: Callable, tg: int = 128, repeats: int = 5,
                        progress: Callable[[str], None] | None = None) -> dict:
    """Greedy decode tok/s of each prompt, plain and speculative, interleaved; medians, the
    median of the pairs' ratios, and the speculator's counts (the last run's)."""
    from engine.generate import stream_generate
    from engine.sampling import make_sampler

    model, tok = loaded.model, loaded.tokenizer
    out = {}
    for name, text in SPECULATE_PROMPTS.items():
        prompt = tok.encode(loaded.template.render([{"role": "user", "content": text}], add_generation_prompt=True),
                            add_special=False, parse_special=True)
        plain, spec, ratios, stats, ids_equal = [], [], [], None, True
        costs: dict[int, list[float]] = {}
        for rep in range(repeats):
            runs = []
            speculator = make_speculator()
            for sp in (None, speculator):
                rs = list(stream_generate(model, tok, prompt, model.make_cache(), make_sampler(0.0), max_tokens=tg,
                                          stop_ids=frozenset(), speculator=sp))
                runs.append(([r.token for r in rs], rs[-1].decode_tps, rs[-1].speculation))
            plain.append(runs[0][1])
            spec.append(runs[1][1])
            ratios.append(runs[1][1] / runs[0][1] if runs[0][1] else 0.0)
            ids_equal &= runs[0][0] == runs[1][0]
            stats = runs[1][2]
            for T, c in pass_costs(speculator).items():
                costs.setdefault(T, []).append(c)
            if progress:
                progress(f"{name} {rep + 1}/{repeats}: plain {runs[0][1]:.1f}, speculative {runs[1][1]:.1f} tok/s")
        out[name] = {"plain_tps": statistics.median(plain), "speculative_tps": statistics.median(spec),
                     "ratio": statistics.median(ratios), "plain_runs": plain, "speculative_runs": spec,
                     "identical_ids": ids_equal, "speculation": stats,
                     "pass_cost": {T: round(statistics.median(c), 2) for T, c in sorted(costs.items())}}
    return out


def pass_costs(speculator) -> dict[int, float]:
    """What a step feeding T tokens cost in plain steps, as the speculator's policy measured it
    during the run (T > 1: drafting and verification; only the lengths it drafted)."""
    seconds = getattr(getattr(speculator, "policy", None), "step_seconds", {})
    one = seconds.get(1)
    return {T: t / one for T, t in seconds.items() if T > 1} if one else {}
