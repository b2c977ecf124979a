"""Per-layer caches with one small shared interface: `kind`, `trimmable`, `offset`, `nbytes`,
`trim`, and `snapshot()` / `restore(state)` / `from_state(state)` over a `CacheState` (the
layer's arrays at a position, by name: what checkpoints copy and saved chats write).

`KVCache` (attention layers) is preallocated for the whole context and trimmable: the
positions past `offset` are simply overwritten later. It holds fp16 values, as llama.cpp's
default F16 cache, stored as their bit patterns (uint16: numba has no float16). Its buffers
are fresh anonymous mappings (`lazy_zeros`), touched only as the conversation grows, so
untouched pages cost no resident memory.

`RecurrentCache` (Gated DeltaNet layers) is a fixed-size state that can be snapshotted and
restored but not trimmed. `cache_bytes(caches)` sums the bytes in use by kind.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np


@dataclass
class CacheState:
    """One layer's contents after `offset` tokens: named arrays (a KV layer's "k", "v" as
    float16, exactly what the cache holds; a recurrent layer's "conv", "state")."""

    offset: int
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeros in their own anonymous mapping: a page becomes resident when first written, and
    the whole mapping goes back to the OS with the array. (np.zeros may instead be served
    from malloc's heap, which zero-fills, and so touches, every page at once: glibc raises
    its mmap threshold after big frees. Seen: +340 MB for an 8K-context SmolLM2 cache.)"""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, n), dtype=dtype).reshape(shape)


KV_DTYPE = np.uint16   # fp16 bit patterns: half the bytes of float32, and llama.cpp's F16 cache


def f16_bits_of(a) -> np.ndarray:
    """float values -> the nearest fp16 values' bit patterns (ties to even, beyond the range to
    inf, as llama.cpp stores them), as the KV cache holds them."""
    with np.errstate(over="ignore"):
        return np.asarray(a, np.float32).astype(np.float16).view(KV_DTYPE)


def f16_values_of(bits) -> np.ndarray:
    """fp16 bit patterns (uint16, e.g. a KV cache's rows) -> their float32 values."""
    if bits.dtype != KV_DTYPE:
        raise TypeError(f"fp16 bit patterns are uint16, not {bits.dtype}")
    return bits.view(np.float16).astype(np.float32)


class KVCache:
    """Keys and values of one attention layer: (n_ctx, n_kv_heads, head_dim) fp16 bit patterns
    (KV_DTYPE; `.view(np.float16)` reads them as numbers). The attention kernels widen them to
    float32 as they read: deep in a chat these rows are most of the bytes a token reads."""

    kind: ClassVar[str] = "kv"
    trimmable: ClassVar[bool] = True       # any suffix can be dropped: positions are overwritten later
    STATE_NAMES: ClassVar[tuple[str, ...]] = ("k", "v")

    def __init__(self, n_ctx: int, n_kv_heads: int, head_dim: int,
                 block: tuple[np.ndarray, np.ndarray] | None = None, layer: int = 0):
        """block: (keys, values) of all layers, (L, n_ctx, heads, dim) each (kv_block); this
        layer then lives in row `layer` of it, which the fused decode step reads whole."""
        self.n_ctx = n_ctx
        self.offset = 0
        self.block, self.layer = block, layer
        if block is None:
            self.keys = lazy_zeros((n_ctx, n_kv_heads, head_dim), KV_DTYPE)
            self.values = lazy_zeros((n_ctx, n_kv_heads, head_dim), KV_DTYPE)
        else:
            self.keys, self.values = block[0][layer], block[1][layer]
            if (self.keys.shape != (n_ctx, n_kv_heads, head_dim) or self.values.shape != self.keys.shape
                    or self.keys.dtype != KV_DTYPE or self.values.dtype != KV_DTYPE):
                raise ValueError(f"a KV block row of shape {self.keys.shape} ({self.keys.dtype}) does not fit "
                                 f"{(n_ctx, n_kv_heads, head_dim)} ({np.dtype(KV_DTYPE)})")

    def move_to_block(self, block: tuple[np.ndarray, np.ndarray], layer: int) -> None:
        """Keep this layer's keys and values in row `layer` of `block` (positions in use copied)."""
        keys, values = block[0][layer], block[1][layer]
        if keys.shape != self.keys.shape or values.shape != self.values.shape or keys.dtype != self.keys.dtype:
            raise ValueError(f"a KV block row of shape {keys.shape} does not fit {self.keys.shape}")
        keys[: self.offset] = self.keys[: self.offset]
        values[: self.offset] = self.values[: self.offset]
        self.keys, self.values, self.block, self.layer = keys, values, block, layer

    def write(self, k: np.ndarray, v: np.ndarray) -> int:
        """Append T positions of float values (rounded to the nearest fp16, overflow to inf, as
        llama.cpp stores them); return the position of the first one."""
        T = k.shape[0]
        p0 = self.offset
        if p0 + T > self.n_ctx:
            raise ValueError(f"KV cache full: {p0} + {T} positions > context {self.n_ctx}")
        self.keys[p0 : p0 + T] = f16_bits_of(k)
        self.values[p0 : p0 + T] = f16_bits_of(v)
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

    def snapshot(self) -> CacheState:
        """A copy of the positions in use, as float16 (exactly the values the cache holds)."""
        return CacheState(self.offset, {"k": self.keys[: self.offset].view(np.float16).copy(),
                                        "v": self.values[: self.offset].view(np.float16).copy()})

    def check(self, st: CacheState) -> None:
        """ValueError unless `st` fits this cache (shapes checked before anything is written)."""
        k, v = st.arrays.get("k"), st.arrays.get("v")
        if k is None or v is None or sorted(st.arrays) != ["k", "v"]:
            raise ValueError(f"a KV state holds 'k' and 'v', not {sorted(st.arrays)}")
        if not 0 <= st.offset <= self.n_ctx or k.shape != (st.offset,) + self.keys.shape[1:] or v.shape != k.shape:
            raise ValueError(f"KV state of shape {k.shape} at {st.offset} does not fit {self.keys.shape}")

    def restore(self, st: CacheState) -> None:
        self.check(st)
        self.keys[: st.offset] = f16_bits_of(st.arrays["k"])   # float16 states: exact
        self.values[: st.offset] = f16_bits_of(st.arrays["v"])
        self.offset = st.offset

    @classmethod
    def from_state(cls, st: CacheState, n_ctx: int) -> KVCache:
        """A new cache of `n_ctx` positions holding `st`."""
        _, n_kv_heads, head_dim = st.arrays["k"].shape
        c = cls(n_ctx, n_kv_heads, head_dim)
        c.restore(st)
        return c


def kv_block(n_layer: int, n_ctx: int, n_kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values of every layer in two (L, n_ctx, heads, dim) arrays of fp16 bits
    (untouched pages)."""
    shape = (n_layer, n_ctx, n_kv_heads, head_dim)
    return lazy_zeros(shape, KV_DTYPE), lazy_zeros(shape, KV_DTYPE)


def kv_block_caches(n_layer: int, n_ctx: int, n_kv_heads: int, head_dim: int) -> list[Cache]:
    """One KVCache per layer, all living in one kv_block (what the fused decode step reads)."""
    block = kv_block(n_layer, n_ctx, n_kv_heads, head_dim)
    return [KVCache(n_ctx, n_kv_heads, head_dim, block, layer) for layer in range(n_layer)]


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

    kind: ClassVar[str] = "recurrent"
    trimmable: ClassVar[bool] = False      # restored from a snapshot instead
    STATE_NAMES: ClassVar[tuple[str, ...]] = ("conv", "state")

    def __init__(self, conv_kernel: int, conv_dim: int, n_v_heads: int, head_v_dim: int, head_k_dim: int):
        self.conv = np.zeros((conv_kernel - 1, conv_dim), dtype=np.float32)
        self.state = np.zeros((n_v_heads, head_v_dim, head_k_dim), dtype=np.float32)
        self.offset = 0
        # While set (speculative decoding): the state before the pass and what the pass fed, so
        # a rewind can go back to the state after any of its tokens (see Replay).
        self.trail: Replay | None = None
        self._spare: tuple[np.ndarray, np.ndarray] | None = None   # the trail's start state, reused

    def advance(self, n: int) -> int:
        """Record that n more tokens went into the state; return the position of the first one."""
        p0 = self.offset
        self.offset = p0 + n
        return p0

    @property
    def nbytes(self) -> int:
        """Bytes of state: constant, whatever the number of tokens fed (twice that once a
        speculative pass has kept its start state: the buffers stay for the next pass)."""
        spare = sum(a.nbytes for a in self._spare) if self._spare is not None else 0
        return self.conv.nbytes + self.state.nbytes + spare

    def reset(self) -> None:
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

    def snapshot(self) -> CacheState:
        return CacheState(self.offset, {"conv": self.conv.copy(), "state": self.state.copy()})

    def check(self, st: CacheState) -> None:
        """ValueError unless `st` fits this cache (shapes checked before anything is written)."""
        conv, state = st.arrays.get("conv"), st.arrays.get("state")
        if conv is None or state is None or sorted(st.arrays) != ["conv", "state"]:
            raise ValueError(f"a recurrent state holds 'conv' and 'state', not {sorted(st.arrays)}")
        if st.offset < 0 or conv.shape != self.conv.shape or state.shape != self.state.shape:
            raise ValueError(f"recurrent state of shapes {conv.shape}, {state.shape} does not fit "
                             f"{self.conv.shape}, {self.state.shape}")

    def restore(self, st: CacheState) -> None:
        self.check(st)
        self.conv[...] = st.arrays["conv"]
        self.state[...] = st.arrays["state"]
        self.offset = st.offset

    @classmethod
    def from_state(cls, st: CacheState) -> RecurrentCache:
        """A new cache holding `st` (its sizes are the arrays')."""
        k1, conv_dim = st.arrays["conv"].shape
        n_v_heads, head_v_dim, head_k_dim = st.arrays["state"].shape
        c = cls(k1 + 1, conv_dim, n_v_heads, head_v_dim, head_k_dim)
        c.restore(st)
        return c

    def start_trail(self) -> None:
        """Keep the state as it is (in buffers this cache reuses from pass to pass: a fresh
        2.2 MB copy per layer cost page faults) and, from now on, what the model feeds."""
        if self._spare is None:
            self._spare = (np.empty_like(self.conv), np.empty_like(self.state))
        np.copyto(self._spare[0], self.conv)
        np.copyto(self._spare[1], self.state)
        self.trail = Replay(self.offset, *self._spare)

    def rewind_to(self, pos: int) -> None:
        """The state after the first `pos` tokens: the trail's start state, then its inputs
        fed again up to pos (CacheTrimError outside the trail)."""
        if pos == self.offset:
            return
        t = self.trail
        if t is None or not t.offset <= pos < self.offset:
            raise CacheTrimError(f"no recurrent state at position {pos} to go back to (state at {self.offset})")
        self.conv[...] = t.conv
        self.state[...] = t.state
        self.offset = t.offset
        n = pos - t.offset
        if n:
            assert t.feed is not None
            t.feed(self, *(np.concatenate([part[i] for part in t.inputs])[:n] for i in range(len(t.inputs[0]))))


@dataclass
class Replay:
    """How a recurrent layer goes back to any position of a speculative pass: its state before
    the pass and what the pass fed it, fed again up to the position asked for. The model runs
    the pass as usual (all its tokens in one call) and adds its inputs; a rejection restores
    the start state and replays the accepted tokens' recurrence (the DeltaNet conv and delta
    rule, no weight read). It replaced a snapshot after every token: 2 MB copies per layer and
    token, most of them never used (a pass of 8 on the 4B shape copied 9 per layer).
    A replay of n tokens in one call equals feeding them one by one (engine.deltanet)."""

    offset: int
    conv: np.ndarray
    state: np.ndarray
    feed: Callable | None = None            # feed(cache, *inputs) advances the cache by len(inputs[0])
    inputs: list[tuple] = field(default_factory=list)   # per model call: its (T, ...) input arrays

    def add(self, feed: Callable, *inputs: np.ndarray) -> None:
        """The model fed `inputs` (arrays of one row per token) to this layer through `feed`."""
        self.feed = feed
        self.inputs.append(tuple(np.array(x, copy=True) for x in inputs))


Cache = KVCache | RecurrentCache   # one layer's cache, whatever its kind


def cache_bytes(caches: list[Cache]) -> dict[str, int]:
    """Bytes in use per cache kind, e.g. {"kv": ..., "recurrent": ...} (what the stats report)."""
    out: dict[str, int] = {}
    for c in caches:
        out[c.kind] = out.get(c.kind, 0) + c.nbytes
    return out


def start_trail(caches: list) -> None:
    """From now on, every recurrent layer can go back to any position fed since (KV layers
    need nothing: they are trimmed): RecurrentCache.start_trail."""
    for c in caches:
        if not c.trimmable:
            c.start_trail()


def rewind(caches: list, pos: int) -> None:
    """Back to the state after the first `pos` tokens: KV layers trimmed, recurrent layers
    from their trail (CacheTrimError if it does not reach that position). The trail ends:
    positions past `pos` no longer exist."""
    for c in caches:
        if c.trimmable:
            if pos > c.offset:
                raise CacheTrimError(f"cannot rewind forward: {pos} > {c.offset}")
            c.trim(c.offset - pos)
        else:
            c.rewind_to(pos)
    stop_trail(caches)


def stop_trail(caches: list) -> None:
    for c in caches:
        if not c.trimmable:
            c.trail = None
