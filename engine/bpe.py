"""Byte-level BPE over a GGUF vocabulary, held in flat tables.

The vocabulary stays one UTF-8 blob with offsets (`StringArray`); two open-addressing hash
tables index it:

- the vocabulary index: token text -> id (FNV-1a over the text's bytes, linear probing,
  the text compared byte for byte on a hit);
- the merge table: (left id, right id) -> (rank, merged id), from `tokenizer.ggml.merges`.

A 248K vocabulary (Qwen3.5) costs ~10 MB this way: the blob, 2 MB of index and 8 MB of
merges. `tokenizers`' Rust BPE held it at ~75 MB (the vocabulary twice as String maps).

Encoding follows llama.cpp's `llm_tokenizer_bpe_session` (and `tokenizers`' BPE, which
agrees): a pre-tokenized piece starts as one symbol per byte (the token of its GPT-2
byte-level character) and repeatedly merges the adjacent pair of lowest rank, leftmost on
ties, until no pair is in the merge table. With `ignore_merges` (llama3-style vocabularies)
a piece that is itself a token is taken whole. A byte whose character is not in the
vocabulary is dropped, as `tokenizers` does.

Every kernel has a plain Python twin (`*_ref`) that tests compare it with.
"""

from __future__ import annotations

import numba
import numpy as np

from engine.jit import JIT_EXACT
from engine.string_array import StringArray

EMPTY = -1
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
# merged keys: left * _KEY_BASE + right (vocabularies are far below 2^31 tokens)
_KEY_BASE = np.int64(1 << 31)

_JIT = JIT_EXACT   # integer work: no fastmath needed


def byte_level_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character map, as a list indexed by byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


BYTE_CHARS = byte_level_chars()


def _byte_utf8_table() -> tuple[np.ndarray, np.ndarray]:
    """(256, 2) UTF-8 bytes of each byte's character and their count (1 or 2)."""
    table = np.zeros((256, 2), np.uint8)
    lens = np.zeros(256, np.int64)
    for b, c in enumerate(BYTE_CHARS):
        e = c.encode("utf-8")
        table[b, : len(e)] = np.frombuffer(e, np.uint8)
        lens[b] = len(e)
    return table, lens


BYTE_UTF8, BYTE_UTF8_LEN = _byte_utf8_table()


def _table_size(n: int) -> int:
    """A power of two with the load factor <= 1/2."""
    size = 16
    while size < 2 * n:
        size *= 2
    return size


# ---------------------------------------------------------------------------------------
# hashing and the vocabulary index


@numba.njit(**_JIT)
def _fnv1a(buf, start, length):
    h = _FNV_OFFSET
    for i in range(start, start + length):
        h = (h ^ np.uint64(buf[i])) * _FNV_PRIME
    return h


@numba.njit(**_JIT)
def _same(a, a_start, b, b_start, length):
    for i in range(length):
        if a[a_start + i] != b[b_start + i]:
            return False
    return True


@numba.njit(**_JIT)
def _find(blob, starts, lengths, slots, q, q_start, q_len):
    """The id of the token whose text is q[q_start : q_start + q_len], or EMPTY."""
    mask = len(slots) - 1
    s = np.int64(_fnv1a(q, q_start, q_len) & np.uint64(mask))
    while True:
        t = slots[s]
        if t == EMPTY:
            return EMPTY
        if lengths[t] == q_len and _same(blob, starts[t], q, q_start, q_len):
            return t
        s = (s + 1) & mask


@numba.njit(**_JIT)
def _build_vocab_index(blob, starts, lengths, slots):
    """Insert every token; returns -1, or the id of the first token whose text repeats."""
    mask = len(slots) - 1
    for t in range(len(starts)):
        s = np.int64(_fnv1a(blob, starts[t], lengths[t]) & np.uint64(mask))
        while True:
            u = slots[s]
            if u == EMPTY:
                slots[s] = t
                break
            if lengths[u] == lengths[t] and _same(blob, starts[u], blob, starts[t], lengths[t]):
                return t
            s = (s + 1) & mask
    return -1


# ---------------------------------------------------------------------------------------
# the merge table


@numba.njit(**_JIT)
def _merge_slot(keys, key):
    """The slot holding `key`, or the empty slot where it would go."""
    mask = len(keys) - 1
    s = np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)) & mask
    while keys[s] != EMPTY and keys[s] != key:
        s = (s + 1) & mask
    return s


@numba.njit(**_JIT)
def _merge_rank(keys, ranks, left, right):
    """Rank of merging (left, right), or -1 if the pair never merges."""
    s = _merge_slot(keys, np.int64(left) * _KEY_BASE + right)
    return ranks[s] if keys[s] != EMPTY else -1


@numba.njit(**_JIT)
def _build_merges(mblob, mstarts, mlengths, blob, starts, lengths, slots, keys, ranks, merged):
    """Insert each "left right" merge whose left, right and left+right are tokens (as
    llama.cpp keeps them); a repeated pair keeps its first (lowest) rank. Returns how many."""
    scratch = np.empty(2 * max(1, mlengths.max() if len(mlengths) else 1), np.uint8)
    n = 0
    for i in range(len(mstarts)):
        st, ln = mstarts[i], mlengths[i]
        cut = -1
        for j in range(st + 1, st + ln):   # the first space after the first character
            if mblob[j] == 32:
                cut = j
                break
        if cut < 0:
            continue
        a = _find(blob, starts, lengths, slots, mblob, st, cut - st)
        b = _find(blob, starts, lengths, slots, mblob, cut + 1, st + ln - cut - 1)
        if a == EMPTY or b == EMPTY:
            continue
        k = 0
        for j in range(st, cut):
            scratch[k] = mblob[j]
            k += 1
        for j in range(cut + 1, st + ln):
            scratch[k] = mblob[j]
            k += 1
        ab = _find(blob, starts, lengths, slots, scratch, 0, k)
        if ab == EMPTY:
            continue
        s = _merge_slot(keys, np.int64(a) * _KEY_BASE + b)
        if keys[s] == EMPTY:
            keys[s] = np.int64(a) * _KEY_BASE + b
            ranks[s] = i
            merged[s] = ab
            n += 1
    return n


@numba.njit(**_JIT)
def _tokens_in(q, sizes, wanted, blob, starts, lengths, slots, hit):
    """Mark hit[t] for every token t with wanted[t] whose text occurs in q, trying only
    the byte lengths in sizes."""
    for p in range(len(q)):
        for k in range(len(sizes)):
            n = sizes[k]
            if p + n > len(q):
                break
            t = _find(blob, starts, lengths, slots, q, p, n)
            if t != EMPTY and wanted[t]:
                hit[t] = True


# ---------------------------------------------------------------------------------------
# encoding


@numba.njit(**_JIT)
def _heap_push(heap, n, item):
    heap[n] = item
    i = n
    while i > 0:
        p = (i - 1) >> 1
        if heap[p] <= heap[i]:
            break
        heap[p], heap[i] = heap[i], heap[p]
        i = p
    return n + 1


@numba.njit(**_JIT)
def _heap_pop(heap, n):
    top = heap[0]
    n -= 1
    heap[0] = heap[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and heap[c + 1] < heap[c]:
            c += 1
        if heap[i] <= heap[c]:
            break
        heap[i], heap[c] = heap[c], heap[i]
        i = c
    return top, n


@numba.njit(**_JIT)
def _encode(text, piece_ends, byte_ids, blob, starts, lengths, slots, keys, ranks, merged,
            ignore_merges, out):
    """BPE every piece of `text` (raw UTF-8; piece i ends at piece_ends[i]) into out;
    returns the number of ids written. out must hold len(text) ids."""
    longest = 0
    begin = 0
    for p in range(len(piece_ends)):
        longest = max(longest, piece_ends[p] - begin)
        begin = piece_ends[p]
    sym = np.empty(longest, np.int64)      # symbol id at its first byte (merged: the left one)
    nxt = np.empty(longest, np.int64)      # next live symbol, -1 at the end
    prv = np.empty(longest, np.int64)
    heap = np.empty(3 * longest + 1, np.int64)   # rank << 32 | left position
    wide = np.empty(2 * longest, np.uint8)       # the piece as byte-level text
    n_out = 0
    begin = 0
    for p in range(len(piece_ends)):
        end = piece_ends[p]
        n = end - begin
        if n == 0:
            continue
        if ignore_merges:
            w = 0
            for i in range(begin, end):
                c = text[i]
                for j in range(BYTE_UTF8_LEN[c]):
                    wide[w] = BYTE_UTF8[c, j]
                    w += 1
            t = _find(blob, starts, lengths, slots, wide, 0, w)
            if t != EMPTY:
                out[n_out] = t
                n_out += 1
                begin = end
                continue
        # one symbol per byte; bytes without a token are dropped
        first = -1
        last = -1
        for i in range(n):
            t = byte_ids[text[begin + i]]
            if t < 0:
                continue
            sym[i] = t
            prv[i] = last
            nxt[i] = -1
            if last >= 0:
                nxt[last] = i
            else:
                first = i
            last = i
        h = 0
        i = first
        while i >= 0 and nxt[i] >= 0:
            r = _merge_rank(keys, ranks, sym[i], sym[nxt[i]])
            if r >= 0:
                h = _heap_push(heap, h, (np.int64(r) << 32) | i)
            i = nxt[i]
        while h > 0:
            top, h = _heap_pop(heap, h)
            r = top >> 32
            i = top & 0xFFFFFFFF
            j = nxt[i]
            if sym[i] < 0 or j < 0:
                continue
            s = _merge_slot(keys, sym[i] * _KEY_BASE + sym[j])
            if keys[s] == EMPTY or ranks[s] != r:
                continue        # stale: one side merged since this pair was queued
            sym[i] = merged[s]
            sym[j] = -1
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                q = _merge_rank(keys, ranks, sym[prv[i]], sym[i])
                if q >= 0:
                    h = _heap_push(heap, h, (np.int64(q) << 32) | prv[i])
            if nxt[i] >= 0:
                q = _merge_rank(keys, ranks, sym[i], sym[nxt[i]])
                if q >= 0:
                    h = _heap_push(heap, h, (np.int64(q) << 32) | i)
        i = first
        while i >= 0:
            out[n_out] = sym[i]
            n_out += 1
            i = nxt[i]
        begin = end
    return n_out


class BytePairEncoder:
    """The merges and vocabulary index of a byte-level BPE vocabulary."""

    def __init__(self, tokens: StringArray, merges: StringArray, ignore_merges: bool = False):
        self.tokens = tokens
        self.ignore_merges = bool(ignore_merges)
        self._blob, self._starts, self._lengths = tokens.arrays()
        self._slots = np.full(_table_size(len(tokens)), EMPTY, np.int32)
        dup = _build_vocab_index(self._blob, self._starts, self._lengths, self._slots)
        if dup >= 0:
            first = next(i for i in range(dup) if tokens[i] == tokens[dup])
            raise ValueError(f"duplicate token in vocabulary: {tokens[dup]!r} has ids {first} and {dup}")
        mblob, mstarts, mlengths = merges.arrays()
        size = _table_size(len(merges))
        self._keys = np.full(size, EMPTY, np.int64)
        self._ranks = np.zeros(size, np.int32)
        self._merged = np.zeros(size, np.int32)
        self.n_merges = _build_merges(mblob, mstarts, mlengths, self._blob, self._starts, self._lengths,
                                      self._slots, self._keys, self._ranks, self._merged)
        # the token of each byte's byte-level character (-1: not in the vocabulary)
        byte_ids = [self.token_to_id(c) for c in BYTE_CHARS]
        self._byte_ids = np.array([-1 if t is None else t for t in byte_ids], np.int64)

    def token_to_id(self, text: str) -> int | None:
        q = np.frombuffer(text.encode("utf-8"), np.uint8)
        t = _find(self._blob, self._starts, self._lengths, self._slots, q, 0, len(q))
        return None if t == EMPTY else int(t)

    def tokens_in(self, data: bytes, sizes: np.ndarray, wanted: np.ndarray) -> list[int]:
        """Ids of the tokens with wanted[id] whose text occurs in data. sizes: the byte
        lengths those tokens have, ascending."""
        if len(wanted) != len(self._starts):
            raise ValueError("wanted must have one entry per token")
        hit = np.zeros(len(wanted), np.bool_)
        _tokens_in(np.frombuffer(data, np.uint8), np.asarray(sizes, np.int64), wanted,
                   self._blob, self._starts, self._lengths, self._slots, hit)
        return np.flatnonzero(hit).tolist()

    def merge_rank(self, left: int, right: int) -> int | None:
        r = _merge_rank(self._keys, self._ranks, left, right)
        return None if r < 0 else int(r)

    def encode_pieces(self, pieces: list[bytes]) -> list[int]:
        """Token ids of pre-tokenized pieces (raw UTF-8 bytes each), in order."""
        text = b"".join(pieces)
        if not text:
            return []
        ends = np.cumsum(np.fromiter((len(p) for p in pieces), np.int64, len(pieces)))
        out = np.empty(len(text), np.int64)
        n = _encode(np.frombuffer(text, np.uint8), ends, self._byte_ids, self._blob, self._starts,
                    self._lengths, self._slots, self._keys, self._ranks, self._merged,
                    self.ignore_merges, out)
        return out[:n].tolist()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._blob, self._starts, self._lengths, self._slots,
                                      self._keys, self._ranks, self._merged))


# ---------------------------------------------------------------------------------------
# the plain Python twin


def encode_pieces_ref(pieces: list[bytes], vocab: dict[str, int], ranks: dict[tuple[int, int], int],
                      ignore_merges: bool = False) -> list[int]:
    """The same BPE as `_encode`, by the textbook loop: merge the lowest-rank pair (leftmost
    on ties) until none is left. `ranks[(left, right)]` = rank; the merged token is the
    concatenation's id in `vocab`."""
    texts = {i: t for t, i in vocab.items()}
    out: list[int] = []
    for piece in pieces:
        wide = "".join(BYTE_CHARS[b] for b in piece)
        if ignore_merges and wide in vocab:
            out.append(vocab[wide])
            continue
        syms = [vocab[BYTE_CHARS[b]] for b in piece if BYTE_CHARS[b] in vocab]
        while len(syms) > 1:
            best = min(((ranks[(a, b)], i) for i, (a, b) in enumerate(zip(syms, syms[1:]))
                        if (a, b) in ranks), default=None)
            if best is None:
                break
            i = best[1]
            syms[i : i + 2] = [vocab[texts[syms[i]] + texts[syms[i + 1]]]]
        out.extend(syms)
    return out
