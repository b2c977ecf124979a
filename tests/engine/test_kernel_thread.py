"""The kernel thread: every parallel kernel of an app runs on one long-lived thread."""

from __future__ import annotations

import threading
import time

import numba
import numpy as np
import pytest

from engine.kernel_thread import KernelThread, kernel_thread


def test_call_runs_on_one_thread_and_reraises():
    kt = KernelThread()
    idents = {kt.call(threading.get_ident) for _ in range(5)}
    assert len(idents) == 1 and threading.get_ident() not in idents
    # from other threads too
    seen = []
    ts = [threading.Thread(target=lambda: seen.append(kt.call(threading.get_ident))) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert set(seen) == idents
    with pytest.raises(ZeroDivisionError):
        kt.call(lambda: 1 / 0)
    # nested calls from the kernel thread run inline (no deadlock)
    assert kt.call(lambda: kt.call(threading.get_ident)) in idents


def test_iterate_yields_in_order_and_reraises_after_earlier_items():
    kt = KernelThread()
    where = []

    def gen(n):
        for i in range(n):
            where.append(threading.get_ident())
            yield i
        raise ValueError("boom")

    out = []
    with pytest.raises(ValueError, match="boom"):
        for x in kt.iterate(gen, 4):
            out.append(x)
    assert out == [0, 1, 2, 3]
    assert set(where) == {kt.call(threading.get_ident)}


def test_closing_the_consumer_closes_the_producer():
    kt = KernelThread()
    closed = threading.Event()
    produced = []

    def gen():   # a slow producer, like a decode loop
        try:
            for i in range(1000):
                produced.append(i)
                yield i
                time.sleep(0.002)
        finally:
            closed.set()

    it = kt.iterate(gen)
    assert next(it) == 0
    it.close()          # waits until the producer has stopped
    assert closed.is_set() and len(produced) < 1000
    # the thread is free again
    assert kt.call(lambda: 7) == 7


def test_paced_handover_delivers_every_item_in_batches():
    """pace: the consumer sleeps while the queue is empty, so a fast producer's items arrive
    in bursts (fewer wake-ups of the consumer's thread), all of them, in order."""
    kt = KernelThread()

    def gen():
        for i in range(60):
            yield i, time.perf_counter()
            time.sleep(0.001)

    got = [(i, t, time.perf_counter()) for i, t in kt.iterate(gen, pace=0.02)]
    assert [i for i, _, _ in got] == list(range(60))
    waits = [seen - made for _, made, seen in got]
    assert max(waits) >= 0.01   # items waited for the batch
    with pytest.raises(ValueError, match="boom"):   # errors still come through after the items
        list(kt.iterate(lambda: (_ for _ in ()).throw(ValueError("boom")), pace=0.02))


def test_pace_read_at_each_wait_and_a_picked_item_or_the_end_is_not_held_back():
    """A long pace (as the app's once-a-second batches) is cut short by an item `wake_on` picks
    (a reply's last response) and by the producer's end: neither waits out the pace."""
    kt = KernelThread()
    asked = []

    def pace():
        asked.append(time.perf_counter())
        return 5.0

    def gen(stop_at):
        for i in range(10):
            yield i
            time.sleep(0.002)
            if i == stop_at:
                time.sleep(0.3)   # e.g. the state saved after the last response
                return

    t0 = time.perf_counter()
    got = list(kt.iterate(gen, 4, pace=pace, wake_on=lambda i: i == 4))
    assert got == [0, 1, 2, 3, 4] and asked
    assert time.perf_counter() - t0 < 2.0   # not the 5 s pace
    t0 = time.perf_counter()
    seen_last = None
    for i in kt.iterate(gen, 4, pace=pace, wake_on=lambda i: i == 4):
        if i == 4:
            seen_last = time.perf_counter() - t0
    assert seen_last is not None and seen_last < 0.25   # before the producer's 0.3 s tail ended
    t0 = time.perf_counter()
    assert list(kt.iterate(gen, 2, pace=pace)) == [0, 1, 2]   # no wake_on: the end cuts the wait
    assert time.perf_counter() - t0 < 2.0


@numba.njit(parallel=True, cache=True)
def _par_sum(a):
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s


def test_parallel_kernels_from_worker_threads_use_one_team():
    """However many app threads ask, the OS thread count stays that of one OpenMP team."""
    import os

    a = np.ones(1 << 16)
    kt = kernel_thread()
    kt.call(_par_sum, a)
    n0 = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        t = threading.Thread(target=lambda: kt.call(_par_sum, a))
        t.start()
        t.join()
    keep = []
    t = threading.Thread(target=lambda: keep.append(kt.call(_par_sum, a)))   # no team of its own
    t.start()
    t.join()
    assert keep == [float(a.size)]
    # a team per calling thread would add a thread for each of the 4 callers; allow one thread
    # that something else in the process (a library's pool, a finished test's executor) starts
    assert len(os.listdir("/proc/self/task")) <= n0 + 1
