"""Which kernel a SIMD family runs per call: one token -> the row kernels, more -> the GEMM.

One token (decode) runs the row kernels of simd_kernels.py (a weight row in the lanes); from
GEMM_MIN_TOKENS on, the activation is reordered once (gemm.interleaved*) and the GEMM
drivers of simd_kernels.py (tokens in the lanes, gemm.py's intrinsics) take it. Each token's
result is the same whatever T and its lane, so prefilling in chunks (of >= 2) equals one
batch bit for bit. Formats without a GEMM (Q2_K, Q3_K, Q5_K, IQ4_XS, F16, BF16) keep their
row kernels for every T.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gguf import GGMLQuantizationType as G

from engine.quants import simd_kernels
from engine.quants.gemm import KQ_KINDS, LEGACY_KINDS, interleaved, interleaved_32

GEMM_MIN_TOKENS = 2
_GROUPS = {"q4_k": 8, "q6_k": 16}

Kernel = Callable[..., Any]


def _entry(kind: str, isa: str, row_kernel: Kernel, row_multi: Kernel) -> tuple[Kernel, Kernel]:
    """(matmul, matmul3) with the row kernels' calls: the GEMM from GEMM_MIN_TOKENS tokens,
    the row kernels below; matmul3 reorders the shared activation once for its weights."""
    gemm_kq, gemm_legacy = simd_kernels.GEMM_DRIVERS[isa]
    prepare: Callable[..., tuple]
    if kind in KQ_KINDS:
        k, groups, driver = KQ_KINDS.index(kind), _GROUPS[kind], gemm_kq

        def prepare(xq, xd, xs):
            return interleaved(xq, xd, xs, groups)
    else:
        k, driver = LEGACY_KINDS.index(kind), gemm_legacy
        prepare = interleaved_32

    def run(w, il, lut, out):
        driver(k, w, *il, lut, out)
    with_sums = kind in KQ_KINDS or kind in ("q4_1", "q5_1")   # the activation's third array

    def matmul(w, xq, xd, *rest):
        *xs, lut, out = rest
        if xq.shape[0] < GEMM_MIN_TOKENS:
            row_kernel(w, xq, xd, *rest)
        else:
            run(w, prepare(xq, xd, xs[0] if with_sums else xd), lut, out)

    def matmul3(w0, w1, w2, xq, xd, xs, lut, out0, out1, out2):
        if xq.shape[0] < GEMM_MIN_TOKENS:
            row_multi(w0, w1, w2, xq, xd, xs, lut, out0, out1, out2)
            return
        il = prepare(xq, xd, xs)
        for w, out in ((w0, out0), (w1, out1), (w2, out2)):
            if out.shape[1]:
                run(w, il, lut, out)

    matmul.__name__, matmul3.__name__ = f"matmul_{kind}_gemm_{isa}", f"matmul3_{kind}_gemm_{isa}"
    return matmul, matmul3


def kernels(isa: str, row_kernels: dict[int, Kernel],
            row_multi: dict[int, Kernel]) -> tuple[dict[int, Kernel], dict[int, Kernel]]:
    """(KERNELS, MULTI_KERNELS) of a family: every format with a GEMM here routed through
    this ISA's (from GEMM_MIN_TOKENS tokens), the others' row kernels as given."""
    ks, ms = dict(row_kernels), dict(row_multi)
    for kind in KQ_KINDS + LEGACY_KINDS:
        t = int(G[kind.upper()])
        ks[t], ms[t] = _entry(kind, isa, row_kernels[t], row_multi[t])
    return ks, ms
