"""numba compile flags shared by every kernel: one place to change them.

error_model="numpy": a float division by zero gives inf/nan as in C, instead of raising
(a corrupt weight must give garbage logits, never an exception inside a kernel).
cache=True: compiled once per machine, loaded from disk afterwards (under the user's cache
folder: engine/kernel_cache.py).
nogil=True: a kernel releases the GIL, so the TUI thread never has to wait for it.
"""

from __future__ import annotations

from typing import Any

# Any: numba.njit's keyword arguments are of several types (its stubs list each one).
JIT: dict[str, Any] = dict(cache=True, fastmath=True, error_model="numpy", nogil=True)
JIT_PAR: dict[str, Any] = dict(JIT, parallel=True)
# Rounding emulation (fp16, half-to-even) must not be reassociated or fused by fastmath.
JIT_EXACT: dict[str, Any] = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
JIT_EXACT_PAR: dict[str, Any] = dict(JIT_EXACT, parallel=True)


def jit_disabled() -> bool:
    """NUMBA_DISABLE_JIT is set: kernels run as plain Python (and intrinsics do not exist)."""
    import numba

    config: Any = numba.config   # its settings are attributes set at import, unknown to mypy
    return bool(config.DISABLE_JIT)
