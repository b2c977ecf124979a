"""Open and validate a GGUF file: mmap, typed metadata, zero-copy tensor views.

A model file is untrusted input. Every count, length, offset and shape is checked
against the file size before anything is allocated or any kernel touches a buffer,
so a corrupt or truncated file raises `ModelFileError` (naming the file and the
problem) instead of crashing, hanging or allocating gigabytes.

Layout (GGUF v2/v3, little-endian):
    "GGUF" u32 version, u64 n_tensors, u64 n_kv
    n_kv    × (string key, u32 value type, value)
    n_tensors × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to general.alignment (default 32), then the data section.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from engine import hugepages
from engine.errors import ModelFileError
from engine.string_array import StringArray
from engine.quants.formats import BLOCK_FORMATS, SUPPORTED_TYPE_NAMES, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Sanity limits: generous for any real model, small enough that a corrupt count
# cannot make us loop for minutes or allocate gigabytes of Python objects.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_STRING_BYTES = 1 << 26  # a chat template or a merge list entry; 64 MiB
MAX_ARRAY_ITEMS = 1 << 25  # vocabularies are ~250K; 32M is far beyond any
MAX_DIMS = 4

# GGUF metadata value types.
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALAR_DTYPES: dict[int, np.dtype] = {
    _U8: np.dtype("<u1"), _I8: np.dtype("<i1"), _U16: np.dtype("<u2"), _I16: np.dtype("<i2"),
    _U32: np.dtype("<u4"), _I32: np.dtype("<i4"), _F32: np.dtype("<f4"), _BOOL: np.dtype("<u1"),
    _U64: np.dtype("<u8"), _I64: np.dtype("<i8"), _F64: np.dtype("<f8"),
}
_TYPE_NAMES = {
    _U8: "u8", _I8: "i8", _U16: "u16", _I16: "i16", _U32: "u32", _I32: "i32", _F32: "f32",
    _BOOL: "bool", _STR: "string", _ARR: "array", _U64: "u64", _I64: "i64", _F64: "f64",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in GGUF order (ne: fastest dimension first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return BLOCK_FORMATS[self.ggml_type].name

    @property
    def n_cols(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


# String arrays longer than this stay in the file (StringArray); shorter ones become lists.
LAZY_STRING_ARRAY = 1024


class _Cursor:
    """Reads little-endian values from the mapped header, checking every read."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, problem: str) -> NoReturn:
        raise ModelFileError(self.path, problem)

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, file has {self.size}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what + " length")
        if n > MAX_STRING_BYTES:
            self.fail(f"{what}: string length {n} is implausible")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what}: not valid UTF-8")

    def string_array(self, count: int, what: str) -> StringArray:
        """count strings, each checked (length, bounds, UTF-8) but not kept as a Python str."""
        starts = np.empty(count, np.int64)
        lengths = np.empty(count, np.uint32)
        buf = self.buf
        for i in range(count):
            n = self.unpack("<Q", what + " length")
            if n > MAX_STRING_BYTES:
                self.fail(f"{what}: string length {n} is implausible")
            self.need(n, what)
            try:
                str(buf[self.pos : self.pos + n], "utf-8")
            except UnicodeDecodeError:
                self.fail(f"{what}: not valid UTF-8")
            starts[i], lengths[i] = self.pos, n
            self.pos += n
        return StringArray(buf, starts, lengths)

    def value(self, vtype: int, what: str):
        if vtype == _STR:
            return self.string(what)
        if vtype == _ARR:
            etype = self.unpack("<I", what + " array type")
            count = self.unpack("<Q", what + " array length")
            if count > MAX_ARRAY_ITEMS:
                self.fail(f"{what}: array length {count} is implausible")
            if etype == _STR:
                # Each string needs at least its 8-byte length: reject early.
                self.need(count * 8, what)
                if count <= LAZY_STRING_ARRAY:
                    return [self.string(what) for _ in range(count)]
                return self.string_array(count, what)
            dt = _SCALAR_DTYPES.get(etype)
            if dt is None:
                self.fail(f"{what}: unsupported array element type {etype}")
            n = count * dt.itemsize
            self.need(n, what)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
            self.pos += n
            return arr.astype(bool) if etype == _BOOL else arr
        dt = _SCALAR_DTYPES.get(vtype)
        if dt is None:
            self.fail(f"{what}: unknown metadata value type {vtype}")
        self.need(dt.itemsize, what)
        v = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.pos)[0]
        self.pos += dt.itemsize
        if vtype == _BOOL:
            return bool(v)
        return float(v) if dt.kind == "f" else int(v)


class GGUFFile:
    """A validated, memory-mapped GGUF file.

    `metadata`: key -> python value (str, int, float, bool, list[str] or StringArray, numpy array).
    `tensors`:  name -> TensorInfo.  `tensor_bytes(name)` is a zero-copy uint8 view
    of shape (n_rows, row_bytes) over the mapping.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None   # set once the file is mapped (close() may run before)
        spath = str(self.path)
        try:
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever
            fd = os.open(spath, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise ModelFileError(spath, f"cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ModelFileError(spath, "not a regular file (a folder, pipe or device)")
            size = st.st_size
            if size < 24:
                raise ModelFileError(spath, f"truncated: {size} bytes is smaller than a GGUF header")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            hugepages.advise(self._mmap)   # before any page is touched (engine.hugepages)
        finally:
            os.close(fd)
        self.file_size = size
        self.pages: hugepages.PagesReport | None = None   # set by map_weights_on_huge_pages()
        try:
            self._parse(spath)
        except BaseException:
            self.close()
            raise

    @property
    def buffer(self) -> mmap.mmap:
        """The mapped file; an error once closed (kernels must never read a closed map)."""
        if self._mmap is None:
            raise ModelFileError(str(self.path), "the file is closed")
        return self._mmap

    # -- parsing -------------------------------------------------------------------------
    def _parse(self, spath: str):
        cur = _Cursor(self.buffer, spath)
        magic = bytes(self.buffer[:4])
        if magic != GGUF_MAGIC:
            raise ModelFileError(spath, f"not a GGUF file (magic {magic!r})")
        cur.pos = 4
        self.version = cur.unpack("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise ModelFileError(spath, f"unsupported GGUF version {self.version}",
                                 "GGUF versions " + ", ".join(map(str, SUPPORTED_VERSIONS)))
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        if n_tensors > MAX_TENSORS:
            cur.fail(f"tensor count {n_tensors} is implausible")
        if n_kv > MAX_KV:
            cur.fail(f"metadata count {n_kv} is implausible")

        meta: dict[str, object] = {}
        self.metadata_types: dict[str, str] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in meta:  # readers disagree on which copy wins: refuse rather than guess
                cur.fail(f"metadata {key!r} appears twice")
            vtype = cur.unpack("<I", f"type of {key!r}")
            if vtype not in _TYPE_NAMES:
                cur.fail(f"metadata {key!r} has unknown value type {vtype}")
            meta[key] = cur.value(vtype, f"metadata {key!r}")
            self.metadata_types[key] = _TYPE_NAMES[vtype]
        self.metadata = meta

        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 16:
            cur.fail(f"general.alignment {alignment!r} is not a small power of two")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.unpack("<I", f"dims of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            shape = tuple(cur.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims))
            gtype = cur.unpack("<I", f"type of {name!r}")
            offset = cur.unpack("<Q", f"offset of {name!r}")
            infos.append((name, shape, gtype, offset))

        data_start = -(-cur.pos // alignment) * alignment
        if data_start > self.file_size:
            cur.fail(f"truncated: data section would start at {data_start}, file has {self.file_size} bytes")
        self.data_offset = data_start

        tensors: dict[str, TensorInfo] = {}
        for name, shape, gtype, offset in infos:
            if name in tensors:
                cur.fail(f"tensor {name!r} appears twice")
            fmt = BLOCK_FORMATS.get(gtype)
            if fmt is None:
                raise ModelFileError(spath, f"tensor {name!r} has unsupported type {_ggml_type_name(gtype)}",
                                     "tensor types " + ", ".join(SUPPORTED_TYPE_NAMES))
            if any(d == 0 for d in shape) or any(d > 1 << 40 for d in shape):
                cur.fail(f"tensor {name!r} has an invalid shape {list(shape)}")
            if shape[0] % fmt.block_size:
                cur.fail(f"tensor {name!r} rows of {shape[0]} values are not a multiple of "
                         f"{fmt.name}'s block of {fmt.block_size}")
            n_rows = 1
            for d in shape[1:]:
                n_rows *= d
            nbytes = n_rows * (shape[0] // fmt.block_size) * fmt.type_size
            if offset % alignment:
                cur.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
            start = data_start + offset
            if start + nbytes > self.file_size:
                cur.fail(f"truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, "
                         f"file has {self.file_size}")
            tensors[name] = TensorInfo(name, gtype, shape, start, nbytes)
        _check_no_overlap(cur, tensors.values())
        self.tensors = tensors

    # -- access --------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(self.path, "general.architecture is missing")
        return arch

    def get(self, key: str, default=None, *, kind: type | tuple | None = None):
        """A metadata value, type-checked when `kind` is given."""
        if key not in self.metadata:
            return default
        v = self.metadata[key]
        if kind is not None and not isinstance(v, kind):
            raise ModelFileError(self.path, f"metadata {key!r} has type {self.metadata_types[key]}, "
                                            f"expected {getattr(kind, '__name__', kind)}")
        return v

    def require(self, key: str, kind: type | tuple | None = None):
        if key not in self.metadata:
            raise ModelFileError(self.path, f"metadata {key!r} is missing")
        return self.get(key, kind=kind)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Zero-copy read-only uint8 view (n_rows, row_bytes) of a tensor's blocks."""
        t = self.tensors[name]
        row_bytes = t.nbytes // t.n_rows
        return np.frombuffer(self.buffer, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(
            t.n_rows, row_bytes)

    def tensor_float(self, name: str) -> np.ndarray:
        """A small tensor (norm weights, biases, conv taps) as float32, shape reversed to numpy order."""
        from engine.quants.linear import get_format   # the numerics: only a model load needs them

        t = self.tensors[name]
        arr = get_format(t.ggml_type).dequantize(self.tensor_bytes(name))
        return np.ascontiguousarray(arr.reshape(tuple(reversed(t.shape))), dtype=np.float32)

    def map_weights_on_huge_pages(self) -> hugepages.PagesReport | None:
        """Ask for the tensor data on 2 MB pages (engine.hugepages); the report is kept in `pages`."""
        self.pages = hugepages.map_weights(self.buffer, str(self.path), self.data_offset)
        return self.pages

    def close(self):
        m = self._mmap
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # numpy views still alive; the mapping goes when they do

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_no_overlap(cur: _Cursor, tensors) -> None:
    """Two tensors sharing bytes: a crafted file (writing one through a cache or reading it as two
    types is never meant); llama.cpp's writer never produces it, so refuse."""
    prev = None
    for t in sorted(tensors, key=lambda t: t.offset):
        if prev is not None and t.offset < prev.offset + prev.nbytes:
            cur.fail(f"tensors {prev.name!r} and {t.name!r} overlap (bytes {t.offset}.."
                     f"{min(t.offset + t.nbytes, prev.offset + prev.nbytes)} are in both)")
        prev = t


def _ggml_type_name(gtype: int) -> str:
    name = type_name(gtype)
    return f"{name} ({gtype})" if not name.startswith("type id") else f"unknown type id {gtype}"
