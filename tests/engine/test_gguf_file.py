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


@pytest.mark.slow   # a worker process per case: minutes on 2 cores
def test_fuzzed_files_load_or_raise_the_clear_error(tiny_llama_path):
    """A fast subset of tools/fuzz_gguf.py: 200 mutated files (every mutation kind) through the
    loader, describe() and a 2-token generation, each in a watched worker: no traceback, crash,
    hang (10 s) or memory blow-up (file + 300 MB)."""
    from tests.gguf_fuzz import FIXTURES, run_cases

    seeds = [tiny_llama_path, FIXTURES / "qwen35" / "tiny-q4_k_m.gguf"]
    report = run_cases(seeds, 200, seed=1234, workers=1, time_limit=10.0)
    s = report.summary()
    assert not report.bad(), {k: report.examples[k] for k in report.bad()}
    assert s["ok"] > 20 and sum(s["clean_errors"].values()) > 100, s


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


def test_duplicate_metadata_key_is_refused(tiny_llama_path, tmp_path):
    from tests.gguf_fuzz import Layout, _duplicate_key

    data = tiny_llama_path.read_bytes()
    label, dup = _duplicate_key(data, Layout.of(data), np.random.default_rng(3))
    p = tmp_path / "dup.gguf"
    p.write_bytes(dup)
    key = label.split(":", 1)[1]
    with pytest.raises(ModelFileError, match=f"metadata '{key}' appears twice"):
        GGUFFile(p)


def test_overlapping_tensors_are_refused(tiny_llama_path, tmp_path):
    data = bytearray(tiny_llama_path.read_bytes())
    from tests.gguf_fuzz import Layout

    lay = Layout.of(bytes(data))
    first = struct.unpack_from("<Q", data, lay.tensor_offsets[0])[0]
    struct.pack_into("<Q", data, lay.tensor_offsets[1], first + 32)  # inside the first tensor
    p = tmp_path / "overlap.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="overlap"):
        GGUFFile(p)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    p = tmp_path / "pipe.gguf"
    os.mkfifo(p)
    with pytest.raises(ModelFileError, match="not a regular file"):
        GGUFFile(p)  # a plain open() would wait for a writer forever


def test_context_size_is_checked_against_the_model(tiny_llama_path):
    from engine.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match="out of range 16..256"):
        load_model(tiny_llama_path, n_ctx=257, within_training_context=True)
    with pytest.raises(InvalidSettingError, match="out of range"):
        load_model(tiny_llama_path, n_ctx=15, within_training_context=True)
    with pytest.raises(InvalidSettingError, match=r"out of range 1..1048576"):
        load_model(tiny_llama_path, n_ctx=10**9)  # the engine's own bound, before any allocation
    assert load_model(tiny_llama_path, n_ctx=256, within_training_context=True).model.n_ctx == 256
    assert load_model(tiny_llama_path, n_ctx=512).model.n_ctx == 512  # tools may go beyond training
