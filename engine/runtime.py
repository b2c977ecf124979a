"""Process-wide engine settings: thread count, threading layer, CPU features, memory."""

from __future__ import annotations

import functools
import os
import resource
import statistics
import sys
import time

import numba
import numpy as np

from engine.jit import JIT_PAR


def set_threads(n: int | None) -> int:
    """Use n numba threads, fixed; None: the default count, adapted to the machine's load
    (engine.threads). Call it on the thread that runs the kernels; return the count in use."""
    from engine import threads

    return threads.configure(n).n


def threads_in_use() -> dict:
    """The thread policy and what it did: count now, maximum, policy, decode steps per count."""
    from engine import threads

    return threads.governor().summary()


def threading_layer() -> str:
    """The numba threading layer actually in use ('omp', 'tbb' or 'workqueue')."""
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet: run a tiny one
        _touch_parallel(np.zeros(4, dtype=np.float32))
        return numba.threading_layer()


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _touch_parallel(a):
    for i in numba.prange(a.shape[0]):
        a[i] += 1


def kernel_family() -> str:
    """Which quant kernels run here: "avx-vnni", "avx2" or "portable" (engine.quants picks)."""
    from engine.quants import linear

    return linear.KERNEL_FAMILY


def cpu_features() -> list[str]:
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avxvnni")
                             if f in have]
                    break
    except OSError:
        pass
    return flags


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


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The largest CPU cache of cpu0 (Linux sysfs: index*/size, as "2048K"), or None where it
    cannot be read."""
    sizes = []
    try:
        for entry in os.listdir(root):
            if entry.startswith("index"):
                with open(os.path.join(root, entry, "size")) as f:
                    text = f.read().strip()
                unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                sizes.append(int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        return None
    return max(sizes) if sizes else None


def probe_bytes(llc: int | None = None) -> int:
    """The bandwidth probe's buffer: 256 MB, or twice the last-level cache where that is larger
    (a server VM may show hundreds of MB of L3; a probe that fits there measures the cache, not
    memory), at most 1 GiB."""
    llc = last_level_cache_bytes() if llc is None else llc
    return min(max(256 << 20, 2 * (llc or 0)), 1 << 30)


def measure_bandwidth(n_bytes: int | None = None, repeats: int = 5, huge_pages: bool = False) -> float:
    """Read bandwidth in bytes/s (median), with the threads currently set: the decode bound.
    n_bytes: the buffer read (default probe_bytes()); huge_pages: read 2 MB pages, as weights
    mapped that way are (engine.hugepages: 4 KB pages read ~20% slower on a VM)."""
    from engine import hugepages

    n_bytes = probe_bytes() if n_bytes is None else n_bytes
    a = hugepages.probe_buffer(n_bytes // 4 // 65536 * 65536 * 4, huge_pages).reshape(-1, 65536)
    _sum_rows(a)  # compile / fault the pages in
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _sum_rows(a)
        times.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(times)


@functools.lru_cache(maxsize=2)
def memory_bandwidth_bytes_s(huge_pages: bool = False) -> float:
    """Read bandwidth with the current threads (measured once per process, 0.2-0.6 s)."""
    return measure_bandwidth(repeats=3, huge_pages=huge_pages)


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux, VmHWM: the high-water mark of its own memory, which
    reset_peak_rss() restarts (getrusage's ru_maxrss also keeps, after an exec, the RSS the
    parent had when it forked: a test runner's 500 MB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux: /proc/self/clear_refs), so a
    temporary buffer (the bandwidth probe's) does not count as the model's. False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss
