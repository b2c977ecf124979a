"""The GGUF loader: metadata and tensors as gguf's own reader sees them, clear errors, fuzzing."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.loader import load_model
from tests.tiny_models import write_tiny_llama


def test_metadata_and_tensors_match_gguf_reader(tiny_llama_path):
    ref = gguf.GGUFReader(tiny_llama_path)
    with GGUFFile(tiny_llama_path) as gf:
        assert gf.version == 3
        assert gf.architecture == "llama"
        assert gf.metadata["llama.block_count"] == 2
        assert gf.metadata["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert isinstance(gf.metadata["tokenizer.ggml.token_type"], np.ndarray)
        assert len(gf.tensors) == len(ref.tensors)
        for t in ref.tensors:
            mine = gf.tensors[t.name]
            assert mine.ggml_type == int(t.tensor_type)
            assert mine.shape == tuple(int(d) for d in t.shape)
            assert mine.offset == t.data_offset
            assert mine.nbytes == t.n_bytes
            raw = gf.tensor_bytes(t.name)
            assert raw.base is not None and not raw.flags.writeable  # a view of the mapping
            np.testing.assert_array_equal(raw.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        GGUFFile(p)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ModelFileError, match="missing.gguf"):
        GGUFFile(tmp_path / "missing.gguf")


def test_truncated_file_says_truncated(tiny_llama_path, tmp_path):
    data = tiny_llama_path.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFileError, match="truncated.*tensor") as e:
        GGUFFile(p)
    assert str(p) in str(e.value)


def test_unsupported_version(tiny_llama_path, tmp_path):
    data = bytearray(tiny_llama_path.read_bytes())
    data[4:8] = struct.pack("<I", 7)
    p = tmp_path / "v7.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="version 7.*supported: GGUF versions 2, 3"):
        GGUFFile(p)


def _write_with_tensor_type(path, type_id: int):
    """A valid tiny file whose first tensor's type id is replaced in place."""
    data = bytearray(path.read_bytes())
    with GGUFFile(path) as gf:
        name = next(iter(gf.tensors))
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    type_pos = pos + 4 + 8 * n_dims
    data[type_pos : type_pos + 4] = struct.pack("<I", type_id)
    return bytes(data)


def test_unknown_quant_type_lists_supported(tiny_llama_path, tmp_path):
    p = tmp_path / "bad-type.gguf"
    p.write_bytes(_write_with_tensor_type(tiny_llama_path, 19))  # IQ1_S
    with pytest.raises(ModelFileError, match=r"unsupported type IQ1_S.*supported: tensor types .*Q4_K"):
        GGUFFile(p)


def test_unknown_architecture_lists_supported(tmp_path):
    p = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_tensor("x", np.zeros(32, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ModelFileError, match=r"architecture 'mamba' is not supported.*supported: architectures .*llama"):
        load_model(p)


def test_wrong_metadata_type_is_named(tiny_llama_path, tmp_path):
    p = tmp_path / "m.gguf"
    write_tiny_llama(p)
    data = p.read_bytes()
    key = b"llama.block_count"
    pos = data.index(key) + len(key)
    data = data[:pos] + struct.pack("<I", 8) + data[pos + 4 :]  # u32 -> string type; bytes now garbage
    p.write_bytes(data)
    with pytest.raises(ModelFileError):
        load_model(p)


def _mutations(data: bytes, rng, n: int):
    """Yield (label, bytes) variants: truncations, byte flips, and extreme integers in the header."""
    size = len(data)
    header_end = min(size, 8192)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            cut = int(rng.integers(0, size))
            yield f"truncate@{cut}", data[:cut]
        elif kind == 1:
            b = bytearray(data)
            for _ in range(int(rng.integers(1, 8))):
                pos = int(rng.integers(0, header_end))
                b[pos] = int(rng.integers(0, 256))
            yield "flip-header", bytes(b)
        elif kind == 2:
            b = bytearray(data)
            pos = int(rng.integers(0, header_end - 8))
            val = [0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 40, int(rng.integers(0, 1 << 31))][
                int(rng.integers(0, 7))]
            width = 8 if val > 0xFFFFFFFF or rng.random() < 0.5 else 4
            b[pos : pos + width] = val.to_bytes(8, "little")[:width]
            yield f"int@{pos}", bytes(b)
        else:
            b = bytearray(data)
            for _ in range(int(rng.integers(1, 64))):
                pos = int(rng.integers(0, size))
                b[pos] = int(rng.integers(0, 256))
            yield "flip-anywhere", bytes(b)


def test_fuzzed_files_load_or_raise_the_clear_error(tiny_llama_path, tmp_path):
    """2,400 mutated/truncated files: each loads (and runs a token) or raises ModelFileError."""
    import resource

    data = tiny_llama_path.read_bytes()
    rng = np.random.default_rng(1234)
    p = tmp_path / "fuzz.gguf"
    counts = {"loaded": 0, "rejected": 0}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for label, variant in _mutations(data, rng, 2400):
        p.write_bytes(variant)
        try:
            loaded = load_model(p, n_ctx=16)
        except ModelFileError as e:
            assert str(p) in str(e), (label, e)
            counts["rejected"] += 1
            continue
        except Exception as e:  # anything else is a bug
            pytest.fail(f"{label}: {type(e).__name__}: {e}")
        # a file that loads must also run safely (weights may be garbage, shapes are valid)
        cache = loaded.model.make_cache()
        loaded.model.forward([0, 1], cache)
        loaded.gguf.close()
        counts["loaded"] += 1
    assert counts["rejected"] > 500 and counts["loaded"] > 100, counts
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kb < 512 * 1024, f"fuzzing grew peak RSS by {grown_kb} KB"


def _with_string_array(path, key, strings: list[bytes]):
    """A minimal GGUF v3 file: no tensors, one string-array metadata entry."""
    body = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1)
    k = key.encode()
    body += struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", 9, 8, len(strings))   # array of strings
    for s in strings:
        body += struct.pack("<Q", len(s)) + s
    path.write_bytes(body + bytes(-len(body) % 32))   # the (empty) data section starts aligned
    return path


def test_big_string_arrays_stay_in_the_file_and_read_like_lists(tmp_path):
    from engine.gguf_file import LAZY_STRING_ARRAY
    from engine.string_array import StringArray

    words = [f"tok{i}·é".encode() for i in range(LAZY_STRING_ARRAY + 7)] + ["".encode(), "末".encode()]
    p = _with_string_array(tmp_path / "v.gguf", "tokenizer.ggml.tokens", words)
    gf = GGUFFile(p)
    arr = gf.metadata["tokenizer.ggml.tokens"]
    want = [w.decode() for w in words]
    assert isinstance(arr, StringArray) and len(arr) == len(want)
    assert arr == want and list(arr) == want and arr[5] == want[5] and arr[-1] == "末" and arr[2:4] == want[2:4]
    assert list(arr.empty_indices()) == [len(words) - 2]
    with pytest.raises(IndexError):
        arr[len(want)]
    own = arr.detached()
    gf.close()
    assert own == want   # its own bytes: still readable after the file is closed
    small = _with_string_array(tmp_path / "s.gguf", "k", [b"a", b"b"])
    assert GGUFFile(small).metadata["k"] == ["a", "b"]


def test_big_string_arrays_are_still_checked(tmp_path):
    from engine.gguf_file import LAZY_STRING_ARRAY

    words = [b"ok"] * (LAZY_STRING_ARRAY + 1)
    bad = _with_string_array(tmp_path / "bad.gguf", "tokenizer.ggml.tokens", words[:-1] + [b"\xff\xfe"])
    with pytest.raises(ModelFileError, match="not valid UTF-8"):
        GGUFFile(bad)
    cut = _with_string_array(tmp_path / "cut.gguf", "tokenizer.ggml.tokens", words)
    cut.write_bytes(cut.read_bytes().rstrip(b"\0")[:-1])
    with pytest.raises(ModelFileError, match="truncated"):
        GGUFFile(cut)
