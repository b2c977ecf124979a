"""Compile (first run) or load (later runs) every kernel a model uses, visibly.

numba compiles lazily at the first call; without this step the first reply would
stall for many seconds with no explanation. Kernels are cached on disk (cache=True),
so later starts only load them.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def warm_up(model, say: Callable[[str], None] | None = None) -> float:
    """Run a 2-token prefill and a 1-token decode on a scratch cache; return seconds taken."""
    t0 = time.perf_counter()
    if say:
        say("Preparing kernels (compiled on the first run, then cached)…")
    cache = model.make_cache()
    model.forward([0, 0], cache, logits="last")   # batched (prefill) kernels
    model.forward([0], cache, logits="last")      # decode kernels
    dt = time.perf_counter() - t0
    if say and dt > 2.0:
        say(f"Kernels ready in {dt:.1f} s.")
    if say:
        from engine.runtime import threading_layer

        layer = threading_layer()
        if layer == "workqueue":  # ~50 us per parallel call instead of ~3: a token costs milliseconds more
            say("Warning: numba fell back to its 'workqueue' threading layer, which is slow here; "
                "install OpenMP (libgomp) or TBB (pip install tbb) for full speed.")
    return dt
