"""StringArray: a big GGUF string array (a vocabulary, its merges) kept as bytes + offsets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StringArray(Sequence):
    """A GGUF string array left in the mapped header: where each UTF-8 string starts and how
    long it is, decoded on access. A 248K-token vocabulary (Qwen3.5) as Python strings costs
    ~17 MB that would live as long as the file is open; this costs 3 MB (the bytes are the
    file's own pages). Compares equal to a list of the same strings."""

    def __init__(self, buf, starts: np.ndarray, lengths: np.ndarray):
        self._buf, self._starts, self._lengths = buf, starts, lengths

    def __len__(self) -> int:
        return len(self._starts)

    def _get(self, i: int) -> str:
        s = int(self._starts[i])
        return str(self._buf[s : s + int(self._lengths[i])], "utf-8")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("string array index out of range")
        return self._get(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self._get(i)

    def __eq__(self, other):
        if isinstance(other, (list, tuple, StringArray)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def byte_length(self, i: int) -> int:
        return int(self._lengths[i])

    def empty_indices(self) -> np.ndarray:
        return np.flatnonzero(self._lengths == 0)

    def detached(self) -> StringArray:
        """The same strings over a private copy of their bytes (valid after the file is closed)."""
        if not len(self):
            return StringArray(b"", self._starts, self._lengths)
        base = int(self._starts[0])
        end = int(self._starts[-1]) + int(self._lengths[-1])
        return StringArray(bytes(self._buf[base:end]), self._starts - base, self._lengths)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bytes as uint8, starts int64, lengths uint32): the strings as kernels read them."""
        return (np.frombuffer(self._buf, np.uint8), self._starts.astype(np.int64, copy=False),
                self._lengths.astype(np.uint32, copy=False))

    @classmethod
    def from_strings(cls, strings) -> StringArray:
        """A compact copy of a list of strings."""
        encoded = [s.encode("utf-8") for s in strings]
        lengths = np.fromiter((len(e) for e in encoded), np.uint32, len(encoded))
        starts = np.zeros(len(encoded), np.int64)
        if len(encoded) > 1:
            np.cumsum(lengths[:-1], out=starts[1:])
        return cls(b"".join(encoded), starts, lengths)

    def __repr__(self):
        return f"StringArray({len(self)} strings)"
