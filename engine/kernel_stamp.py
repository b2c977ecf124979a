"""Stamps that make numba's on-disk cache see changes in other files.

numba keys a cached function on its own file (path, size, mtime) only. A kernel that calls
kernels of other modules (fused_decode's step calls simd_kernels' row kernels, ops' RMSNorm and
attention, activations' quantizers) keeps their machine code inside its own cache entry, so an
edit to a callee would go unseen: the stale step would keep running the old code. The caller's
file therefore carries the sha256 of its callees' sources; `python -m engine.quants.gen_simd_kernels`
rewrites it (which changes the caller's file, so numba compiles it again), and
tests/engine/test_fused_decode.py fails while it is out of date. No numba here.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the modules whose njit functions engine/fused_decode.py calls (directly or through them)
FUSED_DECODE_CALLEES = ("engine/quants/simd_kernels.py", "engine/quants/activations.py",
                        "engine/quants/common.py", "engine/ops.py", "engine/jit.py")
FUSED_DECODE = "engine/fused_decode.py"
_STAMP = re.compile(r'^CALLEE_SOURCES_SHA256 = "[0-9a-f]*"$', re.M)


def sources_sha256(paths=FUSED_DECODE_CALLEES) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update((ROOT / p).read_bytes())
    return h.hexdigest()


def write_fused_decode_stamp() -> bool:
    """Rewrite fused_decode.py's stamp line if it is out of date; True if it changed."""
    path = ROOT / FUSED_DECODE
    text = path.read_text()
    line = f'CALLEE_SOURCES_SHA256 = "{sources_sha256()}"'
    new, n = _STAMP.subn(line, text)
    if n != 1:
        raise RuntimeError(f"{path}: expected one CALLEE_SOURCES_SHA256 line")
    if new != text:
        path.write_text(new)
        return True
    return False
