"""qwen35 (Gated DeltaNet + gated attention) against llama.cpp on the tiny fixtures.

Fixtures: tests/fixtures/qwen35/ (made by tools/make_qwen35_fixtures.py). The F32 model is not
committed: it is rewritten here bit for bit (tests/qwen35_models.py) and its weights digest is
checked against the manifest. The Q8_0 and Q4_K_M files were made by llama.cpp's own quantizer.

For each file and each way of feeding the 40-token prompt (one batch / one token at a time /
4 chunks), then the 24 greedy tokens one by one, the logits after every fed token must be
within the fixture's tolerance of llama.cpp's (0.02 for F32, 0.1 for quantized files).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from engine.cache import CacheTrimError, KVCache, RecurrentCache, cache_bytes
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.models import ARCHITECTURES, qwen35
from tests.qwen35_models import Qwen35Config, weights_digest, write_qwen35

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "qwen35"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
CFG = Qwen35Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in MANIFEST["config"].items()})
PROMPT = MANIFEST["prompt"]
MODES = ("batch", "single", "chunks")
N_CTX = 256


@pytest.fixture(scope="module")
def f32_path(tmp_path_factory) -> Path:
    p = write_qwen35(tmp_path_factory.mktemp("qwen35") / "tiny-f32.gguf", CFG, seed=MANIFEST["seed"])
    assert weights_digest(p) == MANIFEST["f32_weights_digest"], \
        "the regenerated F32 fixture differs from the one llama.cpp ran on: re-run tools/make_qwen35_fixtures.py"
    return p


def _path(name, f32_path) -> Path:
    return f32_path if name == "f32" else FIX / MANIFEST["fixtures"][name]["file"]


_models: dict = {}


def _model(name, f32_path):
    if name not in _models:
        _models[name] = qwen35.Model(GGUFFile(_path(name, f32_path)), N_CTX)
    return _models[name]


def _feed(model, mode, generated):
    """Feed the prompt the way llama.cpp did in `mode`, then the greedy tokens but the last; all logits."""
    cache = model.make_cache()
    if mode == "batch":
        parts = [PROMPT]
    elif mode == "single":
        parts = [[t] for t in PROMPT]
    else:
        step = len(PROMPT) // MANIFEST["chunks"]
        parts = [PROMPT[i : i + step] for i in range(0, len(PROMPT), step)]
    parts += [[t] for t in generated[:-1]]
    return np.concatenate([model.forward(p, cache, logits="all") for p in parts]), cache


def test_quantized_fixture_files_are_the_ones_llama_cpp_ran_on():
    for name, f in MANIFEST["fixtures"].items():
        if f["file"]:
            assert hashlib.sha256((FIX / f["file"]).read_bytes()).hexdigest() == f["sha256"], name


def test_registered():
    assert ARCHITECTURES["qwen35"] is qwen35


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MANIFEST["fixtures"]))
def test_logits_match_llama_cpp(name, mode, f32_path, record_property):
    fx = MANIFEST["fixtures"][name]
    gen = fx["modes"][mode]["generated"]
    got, _ = _feed(_model(name, f32_path), mode, gen)
    want = np.load(FIX / f"{name}.{mode}.logits.npy")
    assert got.shape == want.shape
    d = float(np.abs(got - want).max())
    record_property("max_abs_diff", d)
    print(f"qwen35 {name} {mode}: max |d| = {d:.4g} (tolerance {fx['tolerance']})")
    assert d <= fx["tolerance"], f"{name} {mode}: max |logits - llama.cpp| = {d:.4g}"
    # then the top-1 can only differ from llama.cpp's where llama.cpp itself has a near tie
    s = np.sort(want, axis=1)
    sure = s[:, -1] - s[:, -2] > 2 * d
    assert np.array_equal(got.argmax(1)[sure], want.argmax(1)[sure])


@pytest.mark.parametrize("name", list(MANIFEST["fixtures"]))
def test_greedy_tokens_match_llama_cpp(name, f32_path):
    """Free-running greedy decode from the one-batch prompt gives llama.cpp's tokens.

    Compared up to the first step where llama.cpp's own top1-top2 margin is below twice the
    logits difference measured at that step (a near tie that either engine may break either way).
    """
    fx = MANIFEST["fixtures"][name]
    m = fx["modes"]["batch"]
    model = _model(name, f32_path)
    want_logits = np.load(FIX / f"{name}.batch.logits.npy")[len(PROMPT) - 1 :]
    cache = model.make_cache()
    logits = model.forward(PROMPT, cache, logits="last")[-1]
    ours = []
    for i, want in enumerate(m["generated"]):
        d = float(np.abs(logits - want_logits[i]).max())
        if m["margins"][i] <= 2 * d:
            break
        tok = int(np.argmax(logits))
        assert tok == want, f"{name}: greedy step {i}: {tok} != llama.cpp {want} (margin {m['margins'][i]:.3g})"
        ours.append(tok)
        logits = model.forward([tok], cache, logits="last")[-1]
    print(f"qwen35 {name}: {len(ours)}/{len(m['generated'])} greedy tokens compared and equal")
    assert len(ours) >= min(fx["safe_steps"], 3)


def test_logits_only_where_asked(f32_path):
    model = _model("f32", f32_path)
    c1, c2, c3 = model.make_cache(), model.make_cache(), model.make_cache()
    all_ = model.forward(PROMPT[:7], c1, logits="all")
    last = model.forward(PROMPT[:7], c2, logits="last")
    assert model.forward(PROMPT[:7], c3, logits="none") is None
    assert all_.shape == (7, model.n_vocab) and last.shape == (1, model.n_vocab)
    np.testing.assert_allclose(last[0], all_[-1], rtol=1e-5, atol=1e-5)
    for c in (c1, c2, c3):
        assert [x.offset for x in c] == [7] * len(c)


def test_state_bytes_constant_kv_bytes_grow_only_in_attention_layers(f32_path):
    model = _model("f32", f32_path)
    cache = model.make_cache()
    kinds = [c.kind for c in cache]
    assert kinds == ["recurrent" if r else "kv" for r in model.args.recurrent] == ["recurrent"] * 3 + ["kv"]
    a = model.args
    state = (a.conv_kernel - 1) * a.conv_dim * 4 + a.n_v_heads * a.head_v_dim * a.head_k_dim * 4
    kv_per_token = 2 * a.n_head_kv * a.head_dim * 2   # K and V, fp16
    seen = []
    for n, part in enumerate([PROMPT[:10], PROMPT[10:11], PROMPT[11:30]]):
        model.forward(part, cache, logits="none")
        b = cache_bytes(cache)
        seen.append(b)
        assert b["recurrent"] == 3 * state
        assert b["kv"] == cache[0].offset * kv_per_token
    assert seen[0]["recurrent"] == seen[-1]["recurrent"] and seen[-1]["kv"] > seen[0]["kv"]
    for c in cache:
        if c.kind == "recurrent":
            assert c.state.shape == (a.n_v_heads, a.head_v_dim, a.head_k_dim) and c.state.dtype == np.float32
            assert c.conv.shape == (a.conv_kernel - 1, a.conv_dim)


def test_snapshot_restore_reproduces_the_continuation(f32_path):
    model = _model("f32", f32_path)
    cache = model.make_cache()
    model.forward(PROMPT[:20], cache, logits="none")
    snap = [c.snapshot() for c in cache]
    first = model.forward(PROMPT[20:25], cache, logits="all")
    for c, s in zip(cache, snap):
        c.restore(s)
    assert [c.offset for c in cache] == [20] * len(cache)
    again = model.forward(PROMPT[20:25], cache, logits="all")
    np.testing.assert_array_equal(first, again)


def test_recurrent_cache_cannot_be_trimmed_only_reset():
    c = RecurrentCache(4, 32, 4, 8, 8)
    assert c.kind == "recurrent" and c.nbytes == (3 * 32 + 4 * 8 * 8) * 4
    c.state[:] = 1.0
    c.advance(5)
    assert c.trim(0) == 0 and c.offset == 5
    with pytest.raises(CacheTrimError):
        c.trim(2)
    assert c.offset == 5 and c.state[0, 0, 0] == 1.0
    assert c.trim(5) == 5 and c.offset == 0 and not c.state.any()
    kv = KVCache(16, 2, 4)
    kv.write(np.ones((3, 2, 4), np.float32), np.ones((3, 2, 4), np.float32))
    assert cache_bytes([c, kv]) == {"recurrent": c.nbytes, "kv": 3 * 2 * 2 * 4 * 2}   # fp16: 2 bytes a value


def _float_arrays(obj, seen=None, path="model"):
    """Every float32 ndarray reachable from obj's attributes (views of the file mapping excluded)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.float32:
            yield path, obj
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _float_arrays(v, seen, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_arrays(v, seen, f"{path}[{k!r}]")
    elif type(obj).__module__.startswith("engine.") and not isinstance(obj, (type, GGUFFile)) \
            and isinstance(getattr(obj, "__dict__", None), dict):
        for k, v in vars(obj).items():
            yield from _float_arrays(v, seen, f"{path}.{k}")


def test_no_weight_matrix_is_expanded_to_float():
    """The largest float32 array of a loaded Q4_K_M model is a 1-D tensor or a state buffer."""
    gf = GGUFFile(FIX / MANIFEST["fixtures"]["q4_k_m"]["file"])
    model = qwen35.Model(gf, N_CTX)
    cache = model.make_cache()
    arrays = list(_float_arrays(model)) + list(_float_arrays(cache, path="cache"))
    name, biggest = max(arrays, key=lambda kv: kv[1].size)
    assert biggest.ndim == 1 or name.startswith("cache"), (name, biggest.shape)
    # nothing the model holds (repacked scales included) comes near an expanded weight matrix
    largest_matrix = max(t.shape[0] * t.shape[1] for t in gf.tensors.values() if len(t.shape) == 2 and t.ggml_type)
    own = [(n, a.shape) for n, a in _float_arrays(model)
           if a.size >= largest_matrix // 8 and not n.endswith(".lut")]  # .lut: the shared fp16->fp32 table
    assert not own, own
    quantized = {t.type_name for t in gf.tensors.values() if len(t.shape) == 2}
    assert {"Q4_K", "Q5_K", "Q6_K", "Q8_0"} <= quantized


# --------------------------------------------------------------------------- file variants
def _variant(tmp_path, **kw) -> Path:
    cfg = Qwen35Config(**{**MANIFEST["config"], "rope_sections": tuple(CFG.rope_sections), **kw})
    return write_qwen35(tmp_path / "variant.gguf", cfg, seed=MANIFEST["seed"])


def test_mtp_block_is_never_loaded_or_run(tmp_path, f32_path):
    p = _variant(tmp_path, nextn=1)
    gf = GGUFFile(p)
    assert gf.metadata["qwen35.block_count"] == CFG.n_layer + 1 and "blk.4.nextn.eh_proj.weight" in gf.tensors
    model = qwen35.Model(gf, N_CTX)
    assert model.args.n_layer == CFG.n_layer and len(model.make_cache()) == CFG.n_layer
    names = {getattr(v, "name", None) for layer in model.layers for v in vars(layer).values()}
    assert not any(n and n.startswith("blk.4.") for n in names)
    base = _model("f32", f32_path)
    np.testing.assert_array_equal(model.forward(PROMPT[:9], model.make_cache(), "all"),
                                  base.forward(PROMPT[:9], base.make_cache(), "all"))


def test_layer_pattern_from_interval_when_flags_absent(tmp_path, f32_path):
    model = qwen35.Model(GGUFFile(_variant(tmp_path, write_recurrent_layers=False)), N_CTX)
    assert model.args.recurrent == (True, True, True, False)
    base = _model("f32", f32_path)
    np.testing.assert_array_equal(model.forward(PROMPT[:5], model.make_cache(), "all"),
                                  base.forward(PROMPT[:5], base.make_cache(), "all"))


def test_untied_head_and_numpy_reference(tmp_path):
    """An untied head (output.weight) on F32 weights agrees with the numpy emulation of llama.cpp."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from qwen35_reference import Qwen35Reference

    p = _variant(tmp_path, tied=False)
    model = qwen35.Model(GGUFFile(p), N_CTX)
    assert model.output.name == "output.weight"
    ref = Qwen35Reference(p, N_CTX)
    cache = model.make_cache()
    for part in (PROMPT[:6], PROMPT[6:7], PROMPT[7:12]):
        np.testing.assert_allclose(model.forward(part, cache, "all"), ref.forward(part), atol=2e-3, rtol=0)


def _rewrite(src: Path, dst: Path, changes: dict, drop=()) -> Path:
    """Copy a GGUF file with some metadata values replaced (or dropped)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "qwen35")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in drop:
            continue
        v = changes.get(f.name, f.contents())
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, v, vt, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, v, vt)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_layer_pattern_must_match_the_tensors(tmp_path):
    bad = _rewrite(_variant(tmp_path), tmp_path / "bad.gguf", {"qwen35.full_attention_interval": 2},
                   drop=("qwen35.attention.recurrent_layers",))
    with pytest.raises(ModelFileError, match="layer 1"):
        qwen35.Model(GGUFFile(bad), N_CTX)
    bad2 = _rewrite(_variant(tmp_path), tmp_path / "bad2.gguf",
                    {"qwen35.attention.recurrent_layers": [True, True, False, True]})
    with pytest.raises(ModelFileError, match="layer 2"):
        qwen35.Model(GGUFFile(bad2), N_CTX)


@pytest.mark.parametrize("changes, tensor", [
    # metadata says more v-heads than the tensors have
    ({"qwen35.ssm.time_step_rank": 8, "qwen35.ssm.inner_size": 8 * CFG.ssm_d_state}, "blk.0.attn_qkv.weight"),
    ({"qwen35.feed_forward_length": 512}, "blk.0.ffn_gate.weight"),
    ({"qwen35.attention.key_length": 64, "qwen35.attention.value_length": 64}, "blk.3.attn_q.weight"),
    ({"qwen35.ssm.conv_kernel": 3}, "blk.0.ssm_conv1d.weight"),
])
def test_shapes_are_checked_against_the_metadata(tmp_path, changes, tensor):
    """A file whose metadata disagrees with its tensors fails at load, naming the tensor."""
    bad = _rewrite(_variant(tmp_path), tmp_path / "bad.gguf", changes)
    with pytest.raises(ModelFileError, match=tensor.replace(".", r"\.")):
        qwen35.Model(GGUFFile(bad), N_CTX)


# --------------------------------------------------------------------------- loader, tokenizer, template
def test_loader_tokenizer_and_template_match_llama_cpp():
    from engine.loader import load_model

    loaded = load_model(FIX / MANIFEST["fixtures"]["q8_0"]["file"], n_ctx=N_CTX)
    try:
        assert isinstance(loaded.model, qwen35.Model)
        tok = loaded.tokenizer
        assert tok.encode(MANIFEST["prompt_text"], add_special=True, parse_special=True) == MANIFEST["text_ids"]
        assert tok.decode(MANIFEST["text_ids"]) == MANIFEST["prompt_text"]
        msgs = [{"role": "user", "content": "Hi"}]
        on = loaded.template.render(msgs, add_generation_prompt=True, enable_thinking=True)
        off = loaded.template.render(msgs, add_generation_prompt=True, enable_thinking=False)
        assert on.endswith("<|im_start|>assistant\n<think>\n")
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        ids = tok.encode(off, add_special=True, parse_special=True)
        think, end_think = tok.token_to_id("<think>"), tok.token_to_id("</think>")
        nl = tok.encode("\n", add_special=False)
        assert ids[-6:] == [think] + nl + nl + [end_think] + nl + nl  # no "\n\n" merge in this vocabulary
    finally:
        loaded.gguf.close()


# --------------------------------------------------------------------------- the 4B-shaped file (optional)
_BENCH = "DELTATALK_QWEN35_4B"  # path of the file made by tools/make_qwen35_fixtures.py --bench-4b


@pytest.fixture(scope="session")
def qwen35_4b_path(tmp_path_factory):
    """The 4B-shaped file: $DELTATALK_QWEN35_4B (llama.cpp-quantized), else random Q4_K blocks."""
    import os

    if os.environ.get(_BENCH):
        return os.environ[_BENCH]
    from tests.qwen35_models import QWEN35_4B, QWEN35_4B_VOCAB, write_qwen35

    path = tmp_path_factory.mktemp("q35-4b") / "qwen35-4b-shaped-random-q4_k.gguf"
    return str(write_qwen35(path, QWEN35_4B, seed=1, n_vocab=QWEN35_4B_VOCAB, mat_dtype="q4_k_random"))


@pytest.mark.slow
def test_4b_shaped_file_loads_within_its_size_and_decodes(qwen35_4b_path):
    """RSS added by loading <= file size + 15% (+ the caches, which grow only when used)."""
    import os
    import subprocess
    import sys

    code = f"""
import json, os
from engine import runtime
from engine.gguf_file import GGUFFile
from engine.models import qwen35
import numpy as np
gf = GGUFFile(os.environ["{_BENCH}"])
before = runtime.current_rss_bytes()
m = qwen35.Model(gf, 4096)
after = runtime.current_rss_bytes()
cache = m.make_cache()
logits = m.forward([1, 2, 3], cache, logits="last")
print(json.dumps(dict(added=after - before, size=gf.file_size, finite=bool(np.isfinite(logits).all()),
                      shape=list(logits.shape), state=sum(c.nbytes for c in cache if c.kind == "recurrent"))))
"""
    env = dict(os.environ, **{_BENCH: qwen35_4b_path})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"4B-shaped: RSS added by loading {out['added'] / 1e9:.2f} GB for a {out['size'] / 1e9:.2f} GB file")
    assert out["finite"] and out["shape"] == [1, 248320]
    assert out["added"] <= out["size"] * 1.15
    assert out["state"] == 6 * (3 * 8192 + 32 * 128 * 128) * 4
