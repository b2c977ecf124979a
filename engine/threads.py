"""How many threads the kernels use, and when to use fewer: the one place for that policy.

Why adapt: numba's `omp` layer is libgomp, whose team members spin at the barrier that ends
each parallel region. A decode token is a few hundred regions. When another process takes a
core (a build, a browser tab: on Linux it is in another session, and autogroup scheduling
shares the CPU between sessions before nice counts), one member of a 2-thread team is
descheduled and the other spins until the scheduler runs it again, a time slice per region:
measured on a 2-vCPU EPYC, decode of the default model fell from ~115 to 0.9 tok/s. A team
no bigger than the free cores does not wait: 1 thread keeps its 1-thread speed.

The governor watches each decode step's time and the process's CPU time over it. Steps far
slower than the recent fast step at this thread count, or steps in which the process got
much less than n cores of CPU (a starved team: its spinning members count as CPU, so an
unstarved team gets ~n cores), shrink the team by one once another program has been seen
running on two such steps of the last three (one look at the run queue may catch a kernel worker that is
runnable for a moment). The CPU share
catches a team starved from its first step, when every step is equally slow. With fewer
threads than allowed, it reads the runnable tasks of other processes each step (/proc/loadavg
less our own running threads, ~20 µs); once the others leave a core free for a while, it
tries one more thread for a few steps and keeps it only if that is clearly faster (else it
waits twice as long before the next try). A prompt and each prefill chunk take the cores
others leave free. `--threads N` fixes the count: no adaptation.

numba's thread count is per thread (`numba.set_num_threads` sets the calling thread's): the
governor applies it on the thread that calls it, which is the thread that runs the kernels
(the main thread in `deltatalk run`, the kernel thread in the app).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numba

# numba sets its settings at import from the environment: unknown to a type checker
_NUMBA_CONFIG: Any = numba.config

SHRINK_RATIO = 2.0      # a step this many times the recent fast step: the team waited for a member
CPU_SHARE_MIN = 0.7     # ... or the process got less CPU than this share of n cores (spinning counts)
SLOW_STEPS = 2          # ... this many of the last 3 steps: shrink by one thread
BUSY_CONFIRM = 2        # ... once another program was seen on this many slow steps of the last 3
QUIET_STEPS = 8         # steps with a core free (by the run queue) before trying one more thread
PROBE_STEPS = 4         # steps timed at one more thread (the first is not judged: workers wake up)
PROBE_GAIN = 0.85       # the probe is kept if its median step < this x the median step before it
BACKOFF_S = (1.0, 30.0)  # wait before the next probe: doubles after each failed one, up to the max
RECENT = 16             # steps kept per thread count for the medians
REF_DRIFT = 1.01        # the fast-step reference may rise 1% a step (attention grows with context)
RECHECK_S = 0.002       # before a prompt or chunk, a run queue that says "busy" is read again after this
# ... and, before a chunk that takes long (the last took > LONG_CHUNK_S), again after RECHECK_LONG_S:
# another program's thread team spins 10-20 ms after its work (llama.cpp's does), and a chunk
# started short of a thread then runs seconds at half speed (4B-shaped pp512: 73 vs 90 tok/s)
RECHECK_LONG_S = 0.025
LONG_CHUNK_S = 0.5


def cpus_allowed() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """Physical cores this process may run on (SMT siblings count once), at most numba's pool."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, min(len(cores), _NUMBA_CONFIG.NUMBA_NUM_THREADS))


class RunQueue:
    """Runnable tasks on the machine right now, this process counted once (Linux: /proc/loadavg's
    'running/total' minus our own running threads).

    Why subtract our own: right after a parallel region the team's workers still spin at the
    barrier for a while and count as running; taken as "others", they made every prompt start
    with a shrunk team on an idle machine (pp512 of the default model at 1-thread speed)."""

    def __init__(self, path: str = "/proc/loadavg", tasks: str = "/proc/self/task"):
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = None
        self._tasks = tasks
        self._task_fds: dict[str, int] = {}

    def _own_running(self) -> int:
        """Threads of this process in state R (the caller is one); 1 if that cannot be read."""
        try:
            tids = os.listdir(self._tasks)
        except OSError:
            return 1
        for gone in set(self._task_fds) - set(tids):
            os.close(self._task_fds.pop(gone))
        n = 0
        for tid in tids:
            fd = self._task_fds.get(tid)
            try:
                if fd is None:
                    fd = self._task_fds[tid] = os.open(f"{self._tasks}/{tid}/stat", os.O_RDONLY)
                stat = os.pread(fd, 512, 0)
            except OSError:
                continue
            end = stat.rfind(b")")   # the name may hold spaces and parentheses; the state follows it
            n += stat[end + 2 : end + 3] == b"R"
        return max(1, n)

    def runnable(self) -> int | None:
        if self._fd is None:
            return None
        try:
            total = int(os.pread(self._fd, 128, 0).split()[3].split(b"/")[0])
        except (OSError, IndexError, ValueError):
            return None
        return max(1, total - self._own_running() + 1)


class ThreadGovernor:
    """The thread count of the kernels: fixed, or adapted to the time each decode step takes.

    `clock` and `runnable` (tasks runnable on the machine, None if unknown) and `apply` (sets
    the count on the calling thread) are injectable for tests.
    """

    def __init__(self, max_threads: int, adaptive: bool, cpus: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 runnable: Callable[[], int | None] | None = None,
                 apply: Callable[[int], None] = numba.set_num_threads,
                 cpu_clock: Callable[[], float] = time.process_time,
                 sleep: Callable[[float], None] = time.sleep):
        self.max_threads = max(1, int(max_threads))
        self.adaptive = adaptive and self.max_threads > 1
        self.cpus = cpus or cpus_allowed()
        self.n = self.max_threads
        self.steps_by_threads: Counter = Counter()    # decode steps run at each count
        self.changes = 0
        self._clock, self._apply, self._cpu_clock, self._sleep = clock, apply, cpu_clock, sleep
        self._mark: tuple[float, float] | None = None   # (wall, cpu) at the end of the last step
        self._runnable = runnable if runnable is not None else RunQueue().runnable
        self._recent: dict[int, deque] = {}
        self._ref: dict[int, float] = {}
        self._slow: deque = deque(maxlen=3)
        self._quiet = 0
        self._probe: list[float] | None = None   # step times of a running probe
        self._probe_base = 0.0
        self._backoff = BACKOFF_S[0]
        self._next_probe = 0.0
        self._chunk_s = 0.0      # the last prefill chunk's time
        self._busy: deque = deque(maxlen=3)   # per step: slow or starved, with another program running
        self._lock = threading.Lock()

    # -- what the callers use ------------------------------------------------------------------
    def apply(self) -> int:
        """Set the current count on the calling thread (the one about to run kernels)."""
        self._apply(self.n)
        return self.n

    def before_work(self) -> int:
        """Before a prompt and each prefill chunk: as many threads as the cores others leave
        free (a prefill with a starved team is slow too, one with a core idle is slow for
        nothing), then apply the count on this thread."""
        with self._lock:
            if self.adaptive and self._probe is None:
                free = self._free_cores()
                # a task that is just finishing (another program's thread spinning down)
                # must not shrink a whole prefill: look again a moment later
                waits = (RECHECK_S, RECHECK_LONG_S) if self._chunk_s > LONG_CHUNK_S else (RECHECK_S,)
                for wait in waits:
                    if free is None or free >= self.n:
                        break
                    self._sleep(wait)
                    again = self._free_cores()
                    free = max(free, again) if again is not None else free
                if free is not None and min(self.max_threads, max(1, free)) != self.n:
                    self._set(min(self.max_threads, max(1, free)))
        self._mark = (self._clock(), self._cpu_clock())
        return self.apply()

    def after_chunk(self, seconds: float):
        """A prefill chunk took `seconds` (how long the next may wait for a core to free up)."""
        self._chunk_s = seconds

    def after_step(self, seconds: float) -> int:
        """One decode step took `seconds` at the current count: adapt; return the count for the
        next step (already applied on the calling thread)."""
        with self._lock:
            n = self.n
            self.steps_by_threads[n] += 1
            if not self.adaptive:
                return n
            starved = self._cpu_starved(n)
            if self._probe is not None:
                self._judge_probe(seconds)
            else:
                self._watch(seconds, starved)
            if self.n != n:
                self._apply(self.n)
            return self.n

    def summary(self) -> dict:
        return {"threads": self.n, "max_threads": self.max_threads, "cpus": self.cpus,
                "policy": "adaptive" if self.adaptive else "fixed",
                "steps_by_threads": {str(k): v for k, v in sorted(self.steps_by_threads.items())},
                "changes": self.changes}

    # -- the policy ----------------------------------------------------------------------------
    def _free_cores(self) -> int | None:
        r = self._runnable()
        if r is None:
            return None
        others = max(0, r - 1)   # r counts this process once (RunQueue)
        return max(0, self.cpus - others)

    def _others_running(self, n: int) -> bool:
        """Other programs take a core our n threads need (True where that cannot be read)."""
        free = self._free_cores()
        return free is None or free < n

    def _cpu_starved(self, n: int) -> bool:
        """Did the process get less than CPU_SHARE_MIN of n cores since the last step?"""
        mark = (self._clock(), self._cpu_clock())
        last, self._mark = self._mark, mark
        if last is None or n < 2:
            return False
        wall = mark[0] - last[0]
        return wall > 0 and (mark[1] - last[1]) < CPU_SHARE_MIN * n * wall

    def _record(self, n: int, seconds: float):
        self._recent.setdefault(n, deque(maxlen=RECENT)).append(seconds)
        ref = self._ref.get(n)
        self._ref[n] = seconds if ref is None else min(seconds, ref * REF_DRIFT)

    def _watch(self, seconds: float, starved: bool = False):
        n = self.n
        ref = self._ref.get(n)
        self._record(n, seconds)
        if n > 1:
            self._slow.append(ref is not None and seconds > SHRINK_RATIO * ref)
            # the CPU share is a direct signal: one starved step is enough (each costs a lot).
            # Both count only while another program runs: our own UI thread rendering a batch
            # of text, or the kernel thread waiting for the GIL between steps, slows a step
            # or lowers its CPU share too, and the team must keep its threads for that
            # Another program must be seen on two such steps of the last three: one reading of the run
            # queue also counts a kernel worker that is runnable for a moment, and in the TUI,
            # whose UI thread makes slow steps common, that shrank the team for a second every
            # few replies (a 128-token reply at 93 instead of 135 tok/s)
            self._busy.append((starved or self._slow[-1]) and self._others_running(n))
            if (starved or sum(self._slow) >= SLOW_STEPS) and sum(self._busy) >= BUSY_CONFIRM:
                self._set(n - 1)
                self._next_probe = self._clock() + self._backoff
                return
        if n < self.max_threads:
            free = self._free_cores()
            # n + 1 threads fit if the others leave that many cores (the caller is one of ours)
            self._quiet = self._quiet + 1 if free is None or free >= n + 1 else 0
            if self._quiet >= QUIET_STEPS and self._clock() >= self._next_probe:
                self._probe_base = statistics.median(self._recent[n])
                self._probe = []
                self._set(n + 1)

    def _judge_probe(self, seconds: float):
        probe = self._probe
        assert probe is not None   # called only while a probe runs
        probe.append(seconds)
        judged = probe[1:]
        failed = bool(judged) and max(judged) > 1.5 * self._probe_base
        if not failed and len(probe) < PROBE_STEPS:
            return
        self._probe = None
        if not failed and statistics.median(judged) < PROBE_GAIN * self._probe_base:
            self._backoff = BACKOFF_S[0]
            for s in judged:
                self._record(self.n, s)
            return
        self._set(self.n - 1)
        self._backoff = min(self._backoff * 2, BACKOFF_S[1])
        self._next_probe = self._clock() + self._backoff

    def _set(self, n: int):
        if n != self.n:
            self.changes += 1
        self.n = n
        self._slow.clear()
        self._quiet = 0
        self._busy.clear()


_governor: ThreadGovernor | None = None


def configure(requested: int | None) -> ThreadGovernor:
    """The process's thread policy: `requested` threads fixed, or None for the default count
    adapted to the machine's load. Applies the count on the calling thread."""
    global _governor
    if requested:
        n = max(1, min(int(requested), _NUMBA_CONFIG.NUMBA_NUM_THREADS))
        _governor = ThreadGovernor(n, adaptive=False)
    else:
        _governor = ThreadGovernor(default_threads(), adaptive=True)
    _governor.apply()
    return _governor


def governor() -> ThreadGovernor:
    """The process's thread policy (the default, adaptive one until configure() is called)."""
    global _governor
    if _governor is None:
        _governor = ThreadGovernor(default_threads(), adaptive=True)
    return _governor
