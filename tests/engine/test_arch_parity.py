"""phi3, qwen2 and qwen3 against llama.cpp on tiny fixtures (tools/make_arch_fixtures.py).

Per architecture: the F32 file is rewritten here bit for bit (tests/arch_models.py, digest checked
against the manifest); Q8_0 and Q4_K_M files were made by llama.cpp's own quantizer. For each file
and each way of feeding the 40-token prompt (one batch / one token at a time), then the 24 greedy
tokens one by one, the logits after every fed token must be within the fixture's tolerance of
llama.cpp's (0.02 F32, 0.1 quantized). phi3's F32 file also runs with n_ctx 8192 > its original
context 4096 (`f32_long`: long rope factors), as llama.cpp did.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from engine.gguf_file import GGUFFile
from engine.models import ARCHITECTURES
from tests.arch_models import ArchConfig, weights_digest, write_arch

FIX = Path(__file__).resolve().parents[1] / "fixtures"
ARCHS = ("phi3", "qwen2", "qwen3")
MANIFESTS = {a: json.loads((FIX / a / "manifest.json").read_text()) for a in ARCHS}
CASES = [(a, n, m) for a in ARCHS for n, f in MANIFESTS[a]["fixtures"].items() for m in f["modes"]]

_f32: dict = {}
_models: dict = {}


def f32_path(arch, tmp_root) -> Path:
    if arch not in _f32:
        man = MANIFESTS[arch]
        p = write_arch(tmp_root / f"{arch}-f32.gguf", ArchConfig(**man["config"]), seed=man["seed"])
        assert weights_digest(p) == man["f32_weights_digest"], \
            f"the regenerated {arch} F32 fixture differs from the one llama.cpp ran on"
        _f32[arch] = p
    return _f32[arch]


def model(arch, name, tmp_root):
    key = (arch, name)
    if key not in _models:
        fx = MANIFESTS[arch]["fixtures"][name]
        path = f32_path(arch, tmp_root) if fx["file"] is None else FIX / arch / fx["file"]
        _models[key] = ARCHITECTURES[arch].Model(GGUFFile(path), fx["n_ctx"])
    return _models[key]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("arch")


def _feed(m, prompt, mode, generated):
    cache = m.make_cache()
    parts = [prompt] if mode == "batch" else [[t] for t in prompt]
    parts += [[t] for t in generated[:-1]]
    return np.concatenate([m.forward(p, cache, logits="all") for p in parts])


def test_registered():
    for a in ARCHS:
        assert ARCHITECTURES[a].Model.arch == a


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_files_are_the_ones_llama_cpp_ran_on(arch):
    for name, f in MANIFESTS[arch]["fixtures"].items():
        if f["file"]:
            assert hashlib.sha256((FIX / arch / f["file"]).read_bytes()).hexdigest() == f["sha256"], name


@pytest.mark.parametrize("arch,name,mode", CASES)
def test_logits_match_llama_cpp(arch, name, mode, tmp_root, record_property):
    man = MANIFESTS[arch]
    fx = man["fixtures"][name]
    got = _feed(model(arch, name, tmp_root), man["prompt"], mode, fx["modes"][mode]["generated"])
    want = np.load(FIX / arch / f"{name}.{mode}.logits.npy")
    assert got.shape == want.shape
    d = float(np.abs(got - want).max())
    record_property("max_abs_diff", d)
    print(f"{arch} {name} {mode}: max |d| = {d:.4g} (tolerance {fx['tolerance']})")
    assert d <= fx["tolerance"], f"{arch} {name} {mode}: max |logits - llama.cpp| = {d:.4g}"
    s = np.sort(want, axis=1)
    sure = s[:, -1] - s[:, -2] > 2 * d
    assert np.array_equal(got.argmax(1)[sure], want.argmax(1)[sure])


@pytest.mark.parametrize("arch,name", [(a, n) for a in ARCHS for n in MANIFESTS[a]["fixtures"]])
def test_greedy_tokens_match_llama_cpp(arch, name, tmp_root):
    """Free-running greedy decode from the one-batch prompt gives llama.cpp's tokens, up to the
    first step where llama.cpp's own top1-top2 margin is below twice the logits difference there."""
    man = MANIFESTS[arch]
    m = man["fixtures"][name]["modes"]["batch"]
    mod = model(arch, name, tmp_root)
    want_logits = np.load(FIX / arch / f"{name}.batch.logits.npy")[len(man["prompt"]) - 1 :]
    cache = mod.make_cache()
    logits = mod.forward(man["prompt"], cache)[-1]
    ours = []
    for i, want in enumerate(m["generated"]):
        if m["margins"][i] <= 2 * float(np.abs(logits - want_logits[i]).max()):
            break
        tok = int(np.argmax(logits))
        assert tok == want, f"{arch} {name}: greedy step {i}: {tok} != llama.cpp {want}"
        ours.append(tok)
        logits = mod.forward([tok], cache)[-1]
    print(f"{arch} {name}: {len(ours)}/{len(m['generated'])} greedy tokens compared and equal")
    assert len(ours) >= min(man["fixtures"][name]["safe_steps"], 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_tokenized_like_llama_cpp(arch, tmp_root):
    from engine.loader import load_model

    man = MANIFESTS[arch]
    lm = load_model(f32_path(arch, tmp_root), n_ctx=128)
    try:
        assert lm.tokenizer.encode(man["prompt_text"], add_special=False, parse_special=True) == man["text_ids"]
    finally:
        lm.gguf.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_only_where_asked_and_chunking_is_exact(arch, tmp_root):
    m = model(arch, "f32", tmp_root)
    p = MANIFESTS[arch]["prompt"][:9]
    c1, c2, c3 = m.make_cache(), m.make_cache(), m.make_cache()
    all_ = m.forward(p, c1, logits="all")
    assert m.forward(p, c2, logits="none") is None
    last = m.forward(p[:4], c3, logits="last")
    assert last.shape == (1, m.n_vocab)
    np.testing.assert_array_equal(m.forward(p[4:], c3, logits="all"), all_[4:])
    assert [c.offset for c in c1] == [9] * len(c1)


def test_no_weight_is_expanded_to_float(tmp_root):
    for arch in ARCHS:
        m = model(arch, "q4_k_m", tmp_root)
        for layer in m.layers:
            for v in vars(layer).values():
                assert not (isinstance(v, np.ndarray) and v.ndim == 2), arch
