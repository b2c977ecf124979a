"""Per-layer caches with one small shared interface: `kind`, `offset`, `nbytes`, `trim`, `snapshot`/`restore`.

`KVCache` (attention layers) is preallocated for the whole context and trimmable: the
positions past `offset` are simply overwritten later. Its buffers are fresh anonymous
mappings (`lazy_zeros`), touched only as the conversation grows, so untouched pages cost no
resident memory.

`RecurrentCache` (Gated DeltaNet layers) is a fixed-size state that can be snapshotted and
restored but not trimmed. `cache_bytes(caches)` sums the bytes in use by kind.
"""

from __future__ import annotations

import mmap

import numpy as np


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeros in their own anonymous mapping: a page becomes resident when first written, and
    the whole mapping goes back to the OS with the array. (np.zeros may instead be served
    from malloc's heap, which zero-fills, and so touches, every page at once: glibc raises
    its mmap threshold after big frees. Seen: +340 MB for an 8K-context SmolLM2 cache.)"""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, n), dtype=dtype).reshape(shape)


class KVCache:
    """Keys and values of one attention layer: (n_ctx, n_kv_heads, head_dim) float32.

    Values are stored already rounded to fp16 precision (as llama.cpp's F16 cache holds
    them), in float32 so the attention kernel reads them without conversion.
    """

    kind = "kv"

    def __init__(self, n_ctx: int, n_kv_heads: int, head_dim: int):
        self.n_ctx = n_ctx
        self.keys = lazy_zeros((n_ctx, n_kv_heads, head_dim))
        self.values = lazy_zeros((n_ctx, n_kv_heads, head_dim))
        self.offset = 0

    def write(self, k: np.ndarray, v: np.ndarray) -> int:
        """Append T positions; return the position of the first one."""
        T = k.shape[0]
        p0 = self.offset
        if p0 + T > self.n_ctx:
            raise ValueError(f"KV cache full: {p0} + {T} positions > context {self.n_ctx}")
        self.keys[p0 : p0 + T] = k
        self.values[p0 : p0 + T] = v
        self.offset = p0 + T
        return p0

    @property
    def nbytes(self) -> int:
        """Bytes in use (positions 0..offset), the figure that grows with the chat."""
        per_pos = self.keys[0].nbytes + self.values[0].nbytes
        return self.offset * per_pos

    def trim(self, n: int) -> int:
        """Drop the last n positions; return how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def snapshot(self):
        return (self.offset, self.keys[: self.offset].copy(), self.values[: self.offset].copy())

    def restore(self, snap):
        offset, k, v = snap
        self.keys[:offset] = k
        self.values[:offset] = v
        self.offset = offset


class CacheTrimError(ValueError):
    """A recurrent layer's state cannot be rewound to an earlier position: restore a snapshot."""


class RecurrentCache:
    """The fixed-size state of one Gated DeltaNet layer (Qwen3.5 / Qwen3-Next).

    conv:  (K-1, conv_dim) float32, the last K-1 raw qkv projections, oldest first
    state: (Hv, dv, dk) float32, the delta-rule matrix of each value head (row j = value channel j)

    Its size never changes with the conversation. It summarises every token fed so far, so
    it cannot be trimmed back to an earlier position: `trim(n)` only accepts n == 0 or
    n == offset (back to empty); anything else raises CacheTrimError and the caller restores a
    snapshot taken at (or before) the position it needs.
    """

    kind = "recurrent"

    def __init__(self, conv_kernel: int, conv_dim: int, n_v_heads: int, head_v_dim: int, head_k_dim: int):
        self.conv = np.zeros((conv_kernel - 1, conv_dim), dtype=np.float32)
        self.state = np.zeros((n_v_heads, head_v_dim, head_k_dim), dtype=np.float32)
        self.offset = 0
        # While a list: the model feeds tokens one at a time and records a snapshot after each
        # (speculative decoding rolls back to the state after the last accepted token).
        self.trail: list | None = None

    def advance(self, n: int) -> int:
        """Record that n more tokens went into the state; return the position of the first one."""
        p0 = self.offset
        self.offset = p0 + n
        return p0

    @property
    def nbytes(self) -> int:
        """Bytes of state: constant, whatever the number of tokens fed."""
        return self.conv.nbytes + self.state.nbytes

    def reset(self):
        self.conv.fill(0.0)
        self.state.fill(0.0)
        self.offset = 0

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n == 0:
            return 0
        if n == self.offset:
            self.reset()
            return n
        raise CacheTrimError(f"a recurrent state cannot drop its last {n} of {self.offset} tokens; "
                             "restore a snapshot instead")

    def snapshot(self):
        return (self.offset, self.conv.copy(), self.state.copy())

    def restore(self, snap):
        offset, conv, state = snap
        self.conv[...] = conv
        self.state[...] = state
        self.offset = offset

    def record(self):
        """Called by the model after each token while a trail is kept."""
        self.trail.append(self.snapshot())


def cache_bytes(caches) -> dict[str, int]:
    """Bytes in use per cache kind, e.g. {"kv": ..., "recurrent": ...} (what the stats report)."""
    out: dict[str, int] = {}
    for c in caches:
        out[c.kind] = out.get(c.kind, 0) + c.nbytes
    return out


def start_trail(caches):
    """Keep a snapshot of every recurrent layer after each token fed from now on (KV layers
    need none: they are trimmed), starting with the state as it is."""
    for c in caches:
        if c.kind == "recurrent":
            c.trail = [c.snapshot()]


def rewind(caches, pos: int):
    """Back to the state after the first `pos` tokens: KV layers trimmed, recurrent layers
    restored from their trail (CacheTrimError if no snapshot holds that position). The trail
    ends: positions past `pos` no longer exist."""
    for c in caches:
        if c.kind == "kv":
            if pos > c.offset:
                raise CacheTrimError(f"cannot rewind forward: {pos} > {c.offset}")
            c.trim(c.offset - pos)
        elif pos != c.offset:
            snap = next((s for s in (c.trail or ()) if s[0] == pos), None)
            if snap is None:
                raise CacheTrimError(f"no recurrent snapshot at position {pos} (state at {c.offset})")
            c.restore(snap)
    stop_trail(caches)


def stop_trail(caches):
    for c in caches:
        if c.kind == "recurrent":
            c.trail = None


def can_trim(caches, n: int) -> bool:
    """Whether every layer can drop its last n tokens (KV layers can; recurrent ones only to empty)."""
    return all(c.kind != "recurrent" or min(n, c.offset) in (0, c.offset) for c in caches)
