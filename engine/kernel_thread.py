"""One long-lived thread that runs every parallel kernel of the process.

Why: numba's `omp` threading layer is libgomp, which keeps one thread team per thread that
starts a parallel region, for as long as that thread lives. Two such threads (say the
thread that loaded and warmed up a model, and the thread that decodes) make libgomp manage
more threads than there are CPUs; it then stops spinning between parallel regions and
puts its workers to sleep instead, and every one of the few hundred regions per token pays
a futex wake-up. Measured on 2 cores: decode fell from ~125 to ~50 tok/s whenever the
first thread was still alive (a thread pool keeps it alive). Running all kernel work on a
single thread keeps one team, as in a plain `deltatalk run`.

Apps with worker threads (the TUI) call `kernel_thread().call(fn, ...)` and
`kernel_thread().iterate(gen_fn, ...)`; code already on the kernel thread runs inline.
Note that `numba.set_num_threads` is per thread: set it on the kernel thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


class KernelThread:
    def __init__(self, name: str = "deltatalk-kernels"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = self._pool.submit(threading.get_ident).result()

    def on_it(self) -> bool:
        """Is the caller the kernel thread?"""
        return threading.get_ident() == self._ident

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the kernel thread and wait for its result (its exception is re-raised here)."""
        if self.on_it():
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def iterate(self, gen_fn: Callable[..., Iterator[T]], *args: Any, pace: float | Callable[[], float] = 0.0,
                wake_on: Callable[[T], bool] | None = None, **kwargs: Any) -> Iterator[T]:
        """Run the generator gen_fn(*args, **kwargs) on the kernel thread; yield its items here.

        Items are handed over through a queue as they come (the producer never waits for the
        consumer); with pace > 0 (seconds, or a function giving them, read at each wait) the
        consumer waits that long whenever the queue is empty, so it wakes once per batch of
        items instead of once per item; the wait ends early when the producer ends or has put an
        item that `wake_on` picks (a last item is not held back). If the consumer stops early (the generator is closed), the producer's
        generator is closed after its current item; an exception in the producer is re-raised
        in the consumer after the items produced before it.
        """
        if self.on_it():
            yield from gen_fn(*args, **kwargs)
            return
        items: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        ended = threading.Event()
        wake = threading.Event()   # set with `ended`, and after an item that wake_on picks
        wait_s = pace if callable(pace) else (lambda: pace)

        def produce():
            try:
                try:
                    gen = gen_fn(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001  (not even a generator: the consumer must hear)
                    items.put((False, e))
                    return
                try:
                    for item in gen:
                        items.put((True, item))
                        if wake_on is not None and wake_on(item):
                            wake.set()
                        if stop.is_set():
                            break
                except BaseException as e:  # noqa: BLE001  (handed to the consumer)
                    items.put((False, e))
                    return
                finally:
                    gen.close()
                items.put((True, _DONE))
            finally:
                ended.set()   # a consumer waiting for a batch takes the last items now
                wake.set()

        future = self._pool.submit(produce)
        try:
            while True:
                if items.empty() and not ended.is_set():
                    seconds = wait_s()
                    if seconds > 0:
                        wake.wait(seconds)   # let items gather: one wake-up per batch, not per item
                        if not ended.is_set():
                            wake.clear()
                ok, item = items.get()
                if not ok:
                    raise item
                if item is _DONE:
                    break
                yield item
        finally:
            stop.set()
            future.result()   # the producer has closed its generator (and released the session)


_lock = threading.Lock()
_instance: KernelThread | None = None


def kernel_thread() -> KernelThread:
    """The process's kernel thread (started on first use)."""
    global _instance
    with _lock:
        if _instance is None:
            _instance = KernelThread()
        return _instance
