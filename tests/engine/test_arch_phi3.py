"""phi3 specifics: long/short rope factors, the attention factor, fused vs separate q/k/v, and
shape validation of untrusted files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine import ops
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.loader import load_model
from engine.models import phi3, qwen3
from tests.arch_models import CONFIGS, write_arch

CFG = CONFIGS["phi3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("phi3")
    fused = write_arch(d / "fused.gguf", CFG, seed=3)
    split = write_arch(d / "split.gguf", dataclasses.replace(CFG, fused_qkv=False), seed=3)
    return fused, split


def test_factors_chosen_once_from_the_configured_context(files):
    gf = GGUFFile(files[0])
    short = phi3.Model(gf, 4096)
    long = phi3.Model(gf, 4097)
    assert short.rope_factors_kind == "short" and long.rope_factors_kind == "long"
    np.testing.assert_array_equal(short.rope_freq_factors, gf.tensor_float("rope_factors_short.weight"))
    np.testing.assert_array_equal(long.rope_freq_factors, gf.tensor_float("rope_factors_long.weight"))
    a = short.args
    assert a.n_ctx_orig == 4096 and abs(a.rope_attn_factor - np.sqrt(1 + np.log(32) / np.log(4096))) < 1e-6
    cos, sin = short.rope[0].upto(50)
    c0, s0 = ops.rope_tables(4096, a.n_rot, a.rope_base, short.rope_freq_factors)
    # the attention factor multiplies cos and sin at every position (even p < original context)
    np.testing.assert_allclose(cos[1:50], c0[1:50] * np.float32(a.rope_attn_factor), rtol=1e-6)
    np.testing.assert_allclose(sin[1:50], s0[1:50] * np.float32(a.rope_attn_factor), rtol=1e-6)


def test_separate_qkv_gives_the_fused_result(files):
    fused, split = (phi3.Model(GGUFFile(p), 64) for p in files)
    assert fused.layers[0].w_qkv is not None and split.layers[0].w_qkv is None
    ids = [1, 5, 9, 300, 77, 12]
    a = fused.forward(ids, fused.make_cache(), logits="all")
    b = split.forward(ids, split.make_cache(), logits="all")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_loads_through_the_loader_with_its_template(files):
    lm = load_model(files[0], n_ctx=64)
    assert lm.arch == "phi3"
    ids = lm.tokenizer.encode("<|user|>the wind<|end|>", add_special=False, parse_special=True)
    assert ids[0] == lm.tokenizer.encode("<|user|>", add_special=False, parse_special=True)[0]
    assert lm.tokenizer.decode(ids) == "<|user|> the wind<|end|>"  # SPM: the space prefix
    lm.gguf.close()


def _corrupt(src, dst, name, new_shape):
    """Copy a GGUF with one tensor declared with another shape (a broken file)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "phi3")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), vt)
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.name == name:
            data = np.zeros(new_shape, np.float32)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("name,shape", [("blk.1.attn_qkv.weight", (500, 256)),
                                        ("blk.0.ffn_up.weight", (256, 256)),
                                        ("rope_factors_short.weight", (16,))])
def test_wrong_shapes_name_the_tensor(files, tmp_path, name, shape):
    bad = _corrupt(files[0], tmp_path / "bad.gguf", name, shape)
    with pytest.raises(ModelFileError, match=name.replace(".", r"\.")):
        phi3.Model(GGUFFile(bad), 64)


def test_qwen3_head_dim_from_key_length(tmp_path):
    p = write_arch(tmp_path / "q3.gguf", CONFIGS["qwen3"], seed=1)
    m = qwen3.Model(GGUFFile(p), 32)
    assert m.args.head_dim == 128 and m.args.n_head * m.args.head_dim != m.args.d_model


def test_phi3_stops_on_its_end_of_turn_token():
    from pathlib import Path

    from engine.loader import load_model

    loaded = load_model(Path(__file__).parents[1] / "fixtures" / "phi3" / "tiny-q8_0.gguf", n_ctx=128)
    tok = loaded.tokenizer
    end = tok.token_to_id("<|end|>")
    assert end is not None and end in tok.eog_ids and tok.eot_id == end
