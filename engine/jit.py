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


def release_linking_bitcode(dispatcher) -> int:
    """Drop the parsed LLVM module numba keeps beside each compiled or cached overload of
    `dispatcher` for linking it into callers (`CPUCodeLibrary._shared_module`), and give the
    freed heap back to the OS. Only for entry points that no compiled code calls: the fused
    decode step's module holds every format's kernels, ~10 MB resident for the process's life.
    Returns how many modules were dropped (0 if this numba keeps none there)."""
    dropped = 0
    for cres in list(dispatcher.overloads.values()):
        lib = getattr(cres, "library", None)
        if lib is not None and getattr(lib, "_shared_module", None) is not None:
            lib._shared_module = None
            dropped += 1
    if dropped:
        trim_heap()
    return dropped


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc's malloc_trim; elsewhere nothing)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
