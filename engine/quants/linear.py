"""The formats' numerics, the kernel family this CPU runs, and the objects the models call.

`FORMATS` maps a ggml type id to its `QuantFormat` (block layout from formats.py, numpy
reference dequantization, activation quantizer, numba kernel). `QuantLinear` is the one
object the model code calls: y = W x (decode) and Y = W X (prefill), computed from the
weight's own blocks, never expanded to float.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as G

from engine.errors import UnsupportedQuantError
from engine.quants import activations, floats, kquants, legacy, simd
from engine.quants.common import F16_TO_F32
from engine.quants.formats import BLOCK_FORMATS, SUPPORTED_TYPE_NAMES, BlockFormat, type_name

Kernel = Callable[..., Any]   # a numba kernel: (weights, *activation arrays, lut, out)


@dataclasses.dataclass(frozen=True)
class QuantFormat(BlockFormat):
    """A tensor type's layout (BlockFormat) with its reference math and kernel."""

    dequantize: Callable[[np.ndarray], np.ndarray]  # numpy: raw (R, row_bytes) -> (R, cols) float32
    kernel: Kernel  # numba: (raw, *act_arrays, lut, out)

    def quantize_act(self, X: np.ndarray) -> tuple:
        return activations.QUANTIZERS[self.act](X)

    def matmul_ref(self, raw: np.ndarray, act: tuple) -> np.ndarray:
        """numpy twin: dequantized weights @ dequantized activations, in float64."""
        x = activations.DEQUANT_REF[self.act](act)
        w = self.dequantize(raw).astype(np.float64)
        return (x.astype(np.float64) @ w.T).astype(np.float32)


# Each format's numpy reference dequantization and portable numba kernel.
_NUMERICS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Kernel]] = {
    "F32": (floats.dequantize_f32, floats.matmul_f32),
    "F16": (floats.dequantize_f16, floats.matmul_16bit),
    "BF16": (floats.dequantize_bf16, floats.matmul_16bit),
    "Q4_0": (legacy.dequantize_q4_0, legacy.matmul_q4_0),
    "Q4_1": (legacy.dequantize_q4_1, legacy.matmul_q4_1),
    "Q5_0": (legacy.dequantize_q5_0, legacy.matmul_q5_0),
    "Q5_1": (legacy.dequantize_q5_1, legacy.matmul_q5_1),
    "Q8_0": (legacy.dequantize_q8_0, legacy.matmul_q8_0),
    "IQ4_NL": (legacy.dequantize_iq4_nl, legacy.matmul_iq4_nl),
    "Q2_K": (kquants.dequantize_q2_k, kquants.matmul_q2_k),
    "Q3_K": (kquants.dequantize_q3_k, kquants.matmul_q3_k),
    "Q4_K": (kquants.dequantize_q4_k, kquants.matmul_q4_k),
    "Q5_K": (kquants.dequantize_q5_k, kquants.matmul_q5_k),
    "Q6_K": (kquants.dequantize_q6_k, kquants.matmul_q6_k),
    "IQ4_XS": (kquants.dequantize_iq4_xs, kquants.matmul_iq4_xs),
}
FORMATS: dict[int, QuantFormat] = {
    t: QuantFormat(**dataclasses.asdict(b), dequantize=_NUMERICS[b.name][0], kernel=_NUMERICS[b.name][1])
    for t, b in BLOCK_FORMATS.items()
}

# On CPUs with AVX2 the block formats run the vpmaddubsw kernels of simd_kernels.py (same
# signature, same math); PORTABLE_KERNELS keeps the plain loops (used without AVX2, or with
# DELTATALK_NO_SIMD=1, and by the tests that compare the two).
# Kernel families, picked from the CPU (KERNEL_FAMILY names the one in use; bench and the TUI
# overlay show it):
#   "avx-vnni": the AVX2 row kernels for decode (simd.py -> generated simd_kernels.py) and the
#               tokens-in-lanes prefill GEMM of gemm.py with vpdpbusd (AVX-VNNI, or AVX-512
#               VNNI: zmm forms of both measured no faster on Zen 5, decode being memory-bound);
#   "avx2":     the same row kernels and the GEMM with vpmaddubsw;
#   "portable": plain numba loops (no AVX2, or DELTATALK_NO_SIMD=1).
# DELTATALK_NO_VNNI=1 steps down to "avx2" (the tests run every family the CPU has).
# PORTABLE_KERNELS and AVX2_KERNELS keep the row kernels for the tests that compare them.
PORTABLE_KERNELS: dict[int, Kernel] = {k: f.kernel for k, f in FORMATS.items()}
SIMD_KERNELS: dict[int, Kernel] = {}
MULTI_KERNELS: dict[int, Kernel] = {}
AVX2_KERNELS: dict[int, Kernel] = {}
AVX2_MULTI_KERNELS: dict[int, Kernel] = {}
KERNEL_FAMILY = "portable"
if simd.HAVE_AVX2 and os.environ.get("DELTATALK_NO_SIMD", "") != "1":
    try:
        from engine.quants import simd_kernels as _sk
    except ImportError as e:   # generated from an older simd.py / gemm.py
        raise ImportError(f"{e}: engine/quants/simd_kernels.py is stale; regenerate it with "
                          "`python -m engine.quants.gen_simd_kernels`") from e
    from engine.quants import gemm_dispatch

    AVX2_KERNELS, AVX2_MULTI_KERNELS = _sk.KERNELS, _sk.MULTI_KERNELS
    if simd.HAVE_AVX_VNNI and os.environ.get("DELTATALK_NO_VNNI", "") != "1":
        KERNEL_FAMILY, _isa = "avx-vnni", "avxvnni"
    else:
        KERNEL_FAMILY, _isa = "avx2", "avx2"
    SIMD_KERNELS, MULTI_KERNELS = gemm_dispatch.kernels(_isa, AVX2_KERNELS, AVX2_MULTI_KERNELS)
    FORMATS = {k: dataclasses.replace(f, kernel=SIMD_KERNELS.get(k, f.kernel)) for k, f in FORMATS.items()}
# The row kernels alone (no GEMM): each token's result is bit for bit what a one-token call
# gives, whatever T. The GEMM sums in another order, so a batch through it differs from
# decode in the last bits; speculative verification must equal decode, so it takes these.
TOKEN_EXACT_KERNELS: dict[int, Kernel] = {k: AVX2_KERNELS.get(k, f.kernel) for k, f in FORMATS.items()}
TOKEN_EXACT_MULTI_KERNELS = dict(AVX2_MULTI_KERNELS)

# Float weights are handed to their kernels as float32 / uint16 views of the bytes, and
# the 16-bit kernel needs the right table; Q8_0's kernel reads its bytes as signed.
_WEIGHT_VIEW: dict[int, type[np.generic]] = {G.F32: np.float32, G.F16: np.uint16, G.BF16: np.uint16, G.Q8_0: np.int8}
_LUT: dict[int, np.ndarray] = {G.BF16: floats.BF16_TO_F32}


def get_format(ggml_type: int) -> QuantFormat:
    fmt = FORMATS.get(int(ggml_type))
    if fmt is None:
        raise UnsupportedQuantError(f"tensor type {type_name(ggml_type)} is not supported (supported: {', '.join(SUPPORTED_TYPE_NAMES)})")
    return fmt


def kernel_weights(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """The view of the raw (N, row_bytes) blocks that the type's kernel reads."""
    view = _WEIGHT_VIEW.get(int(ggml_type))
    return raw.view(view) if view is not None else raw


class QuantLinear:
    """y = W x for a weight kept in its GGUF blocks. raw: uint8 (n_out, row_bytes)."""

    def __init__(self, raw: np.ndarray, ggml_type: int, n_in: int, n_out: int, name: str = "weight"):
        self.fmt = get_format(ggml_type)
        self.name = name
        self.n_in, self.n_out = int(n_in), int(n_out)
        try:
            row_bytes = self.fmt.row_bytes(self.n_in)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.shape != (self.n_out, row_bytes):
            got = f"{getattr(raw, 'dtype', type(raw))} {getattr(raw, 'shape', '')}"
            raise ValueError(f"{name}: expected uint8 blocks of shape {(self.n_out, row_bytes)} for "
                             f"{self.fmt.name} {self.n_out}x{self.n_in}, got {got}")
        if not raw.flags.c_contiguous:
            raise ValueError(f"{name}: blocks must be C-contiguous")
        self.raw = raw
        self.weights = kernel_weights(raw, ggml_type)
        self.lut = _LUT.get(int(ggml_type), F16_TO_F32)
        self.nbytes = raw.nbytes

    def quantize(self, X: np.ndarray) -> tuple:
        """The activation as this weight's kernel takes it (shareable by same-type weights)."""
        if X.ndim != 2 or X.shape[1] != self.n_in:
            raise ValueError(f"{self.name}: input of shape {X.shape}, expected (T, {self.n_in})")
        return self.fmt.quantize_act(np.ascontiguousarray(X, dtype=np.float32))

    def matmul_quantized(self, act: tuple, out: np.ndarray | None = None, token_exact: bool = False) -> np.ndarray:
        """token_exact: every row bit-identical to a one-token call (row kernels, no GEMM)."""
        T = act[0].shape[0]
        if act[0].shape[1] != self.n_in:
            raise ValueError(f"{self.name}: activation width {act[0].shape[1]}, expected {self.n_in}")
        if out is None:
            out = np.empty((T, self.n_out), dtype=np.float32)
        elif out.shape != (T, self.n_out) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"{self.name}: output buffer {out.shape}, expected ({T}, {self.n_out}) float32")
        kernel = TOKEN_EXACT_KERNELS[self.fmt.ggml_type] if token_exact else self.fmt.kernel
        kernel(self.weights, *act, self.lut, out)
        return out

    def matmul(self, X: np.ndarray, out: np.ndarray | None = None, token_exact: bool = False) -> np.ndarray:
        """X (T, n_in) float32 -> (T, n_out)."""
        return self.matmul_quantized(self.quantize(X), out, token_exact)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.matmul(x.reshape(1, -1))[0]

    def matvec_into(self, x: np.ndarray, out: np.ndarray) -> None:
        self.matmul(x.reshape(1, -1), out.reshape(1, -1))

    def __repr__(self):
        return f"QuantLinear({self.name}, {self.fmt.name}, {self.n_out}x{self.n_in})"


class LinearGroup:
    """Weights that read the same input (q/k/v, gate/up, DeltaNet's four projections): Y_i = W_i X.

    The input is quantized once per activation type (Q4_K and Q6_K both take Q8_K), and up
    to three weights of one format run in a single parallel region when a fused kernel
    exists: per token, one launch instead of three. The results equal the separate calls.
    """

    def __init__(self, linears: list[QuantLinear]):
        if not linears or len({l.n_in for l in linears}) != 1:
            raise ValueError(f"a group needs weights of one input width, got {linears}")
        self.linears = list(linears)
        self.n_in = linears[0].n_in
        # plan: per activation type, the first weight (its quantizer) and the launches:
        # (fused kernel, [indices]) for same-format runs of 2-3, or (None, [i]) alone
        self.plan: list[tuple[int, list[tuple]]] = []
        by_act: dict[str, list[int]] = {}
        for i, l in enumerate(self.linears):
            by_act.setdefault(l.fmt.act, []).append(i)
        for idx in by_act.values():
            by_type: dict[int, list[int]] = {}
            for i in idx:
                by_type.setdefault(self.linears[i].fmt.ggml_type, []).append(i)
            launches: list[tuple[Kernel | None, list[int]]] = []
            for ggml_type, same in by_type.items():
                fused = MULTI_KERNELS.get(ggml_type)
                for j in range(0, len(same), 3):
                    part = same[j:j + 3]
                    if fused is not None and len(part) > 1:
                        launches.append((fused, part))
                    else:
                        launches.extend((None, [i]) for i in part)
            self.plan.append((idx[0], launches))
        self.fused = any(k is not None for _, launches in self.plan for k, _ in launches)
        self.shared_act = len(self.plan) == 1

    def matmul(self, X: np.ndarray, token_exact: bool = False) -> list[np.ndarray]:
        """X (T, n_in) float32 -> [(T, n_out_i)] in the order of the weights.

        token_exact: every row bit-identical to a one-token call (row kernels, no GEMM)."""
        T = X.shape[0]
        outs: list = [None] * len(self.linears)
        for first, launches in self.plan:
            act = self.linears[first].quantize(X)
            for kernel, idx in launches:
                if kernel is not None and token_exact:
                    kernel = TOKEN_EXACT_MULTI_KERNELS.get(self.linears[idx[0]].fmt.ggml_type)
                    if kernel is None:  # no fused row kernel: the weights one by one
                        for i in idx:
                            outs[i] = self.linears[i].matmul_quantized(act, token_exact=True)
                        continue
                if kernel is None:
                    outs[idx[0]] = self.linears[idx[0]].matmul_quantized(act, token_exact=token_exact)
                    continue
                lins = [self.linears[i] for i in idx]
                ys = [np.empty((T, l.n_out), dtype=np.float32) for l in lins]
                ws = [l.weights for l in lins]
                if len(lins) == 2:   # an empty third weight of the same array type
                    ws.append(ws[1][:0])
                    ys3 = ys + [np.empty((T, 0), dtype=np.float32)]
                else:
                    ys3 = ys
                xs = act[2] if len(act) == 3 else act[1]   # sums / bsums, or the scales again
                kernel(ws[0], ws[1], ws[2], act[0], act[1], xs, lins[0].lut, ys3[0], ys3[1], ys3[2])
                for i, y in zip(idx, ys):
                    outs[i] = y
        return outs

    def __repr__(self):
        parts = []
        for _, launches in self.plan:
            parts.append(" + ".join(("fused " if k is not None else "") + "/".join(self.linears[i].name for i in idx)
                                    for k, idx in launches))
        return f"LinearGroup({'; '.join(parts)})"
