"""deltatalk's inference engine: GGUF files run from their quantized blocks with numba.

This package never imports `chatapp`.
"""

from engine import cpu_target
from engine.kernel_cache import use_user_cache_dir

use_user_cache_dir()  # before numba is imported anywhere: it reads NUMBA_CACHE_DIR once
cpu_target.apply()    # DELTATALK_CPU=avx2: numba's target CPU, read once too


def _no_numpy_hugepages() -> None:
    """numpy asks for transparent huge pages on its big arrays (madvise). The engine's per-chunk
    buffers come and go, and then each fault can wait for the kernel to compact memory into a
    2 MB page, and RSS counts whole 2 MB pages: on a fragmented machine we saw prefill 30%
    slower and 120 MB more RSS in some runs. The weights (a file mapping) and the bandwidth
    probe ask for 2 MB pages themselves (engine.hugepages)."""
    import importlib

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


_no_numpy_hugepages()
