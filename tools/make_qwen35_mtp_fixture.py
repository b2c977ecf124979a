#!/usr/bin/env python
"""A tiny Qwen3.5 GGUF with its MTP (nextn) block, made by llama.cpp's own converter, and
llama.cpp's reference outputs for it: the trunk's logits and output-normed hidden states, and
the MTP head's logits and hidden states (llama.cpp's MTP context) for every position pair.

    /work/peer-venv/bin/python tools/make_qwen35_mtp_fixture.py LLAMA_CPP_SRC [--out tests/fixtures/qwen35_mtp]

LLAMA_CPP_SRC: a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/), e.g. the
one vendored in the llama-cpp-python sdist the peer venv was built from. Runs in a venv with
llama-cpp-python (built with qwen35 MTP support), torch, safetensors, transformers and numpy;
it imports from this repository only tests/qwen35_models.py's vocabulary and random numbers
(numpy only). Nothing from llama.cpp is copied into the repository: the converter and the
quantizer run from LLAMA_CPP_SRC / llama-cpp-python, and only their outputs are kept.

What it does:
1. writes a tiny random Hugging Face checkpoint in a temporary directory: config.json
   (architectures Qwen3_5ForCausalLM, 1 Gated DeltaNet + 1 gated-attention layer, D=128,
   tied embeddings, mtp_num_hidden_layers 1), model.safetensors with the trunk and the
   `mtp.*` tensors (fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm, layers.0.*), and a
   byte-level BPE tokenizer (tokenizer.json / tokenizer_config.json) with the tiny Qwen vocabulary
   of tests/qwen35_models.py;
2. converts it with llama.cpp's converter, run as a library: the model class registered for
   Qwen3_5ForCausalLM does every tensor (the `mtp.*` -> `blk.{n_layer}.nextn.*` mapping, the
   +1 of the zero-centred norms, the V-head reorder). Only the vocabulary step's pre-tokenizer
   detection is overridden: it hashes a real tokenizer's output, which a 291-token vocabulary
   cannot match, so the pre-tokenizer is set to "qwen35" (what the real Qwen3.5 files carry).
   Output: F32 (tiny-mtp-f32.gguf);
3. quantizes that file to Q8_0 with llama.cpp's quantizer (llama_model_quantize);
4. runs llama.cpp on both files (n_threads 2): the target context with nextn embeddings on
   (every row's output-normed hidden state h), then an MTP context (LLAMA_CONTEXT_TYPE_MTP) fed
   the pairs (h_{p-1}, x_p) at MTP position p (h_{-1} = 0), as common/speculative.cpp's
   draft-mtp `process()` does; and a chained draft of 4 steps from the end of the prompt (each
   step feeds the MTP block's own output hidden state), as its `draft()` does;
5. writes `<name>.trunk_logits.npy` (P, V), `<name>.trunk_h.npy` (P, D), `<name>.mtp_logits.npy`
   (P, V) (row p: the MTP head's logits after the pair at position p, i.e. its guess for x_{p+1}),
   `<name>.mtp_h.npy` (P, D), `<name>.chain_logits.npy` / `.chain_h.npy` (4 draft steps) and
   `manifest.json` (prompt ids, the configuration, digests, llama-cpp-python's version).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "qwen35_mtp"

SEED = 7
N_PROMPT = 40
N_CHAIN = 4
# Tiny Qwen3.5 (HF names). Widths are multiples of 32 (Q8_0 blocks); head_dim 64 with a quarter
# rotated (n_rot 16 = 2 * sum(mrope_section)); DeltaNet with Hk=2 != Hv=4 (the V-head reorder).
CONFIG = {
    "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "layer_types": ["linear_attention", "full_attention"], "full_attention_interval": 2,
    "mtp_num_hidden_layers": 1,
}
EMBD_STD = 0.2
# The final norms (model.norm, mtp.norm: zero-centred, applied as 1 + w) are centred on 0.2 (w ~ -0.8):
# logits of std ~1 keep Q8_0's activation rounding flips small against the tolerance (see
# tools/make_qwen35_fixtures.py, OUTPUT_NORM_MEAN).
HEAD_NORM_MEAN = 0.2
PROMPT_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "Write the story of the wind and the sea in three short lines.<|im_end|>\n"
               "<|im_start|>assistant\n<think>\n")


def sha256_file(path) -> str:
    sys.path.insert(0, str(ROOT))
    from tools.make_qwen35_fixtures import sha256_file as digest   # stdlib only: fine in the peer venv

    return digest(path)


# --------------------------------------------------------------------------- 1. checkpoint
def hf_tensors(cfg: dict, n_vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights under the Hugging Face Qwen3.5 names (incl. mtp.*), (out, in) order."""
    sys.path.insert(0, str(ROOT))
    from tests.qwen35_models import _Rand

    rnd = _Rand(seed)
    D, FF = cfg["hidden_size"], cfg["intermediate_size"]
    Hq, Hkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    Hk, Hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, K = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], cfg["linear_conv_kernel_dim"]
    conv_dim = 2 * Hk * dk + Hv * dv
    out: dict[str, np.ndarray] = {}

    def mat(name, n_out, n_in):
        out[name] = rnd.uniform((n_out, n_in), std=1.0 / np.sqrt(n_in))

    def norm(name, n, mean=0.0, std=0.1):   # zero-centred RMSNorm weight (the model uses 1 + w)
        out[name] = rnd.uniform((n,), std=std, mean=mean)

    def attention(p):
        mat(p + "self_attn.q_proj.weight", Hq * hd * 2, D)    # per head [q | gate]
        mat(p + "self_attn.k_proj.weight", Hkv * hd, D)
        mat(p + "self_attn.v_proj.weight", Hkv * hd, D)
        mat(p + "self_attn.o_proj.weight", D, Hq * hd)
        norm(p + "self_attn.q_norm.weight", hd)
        norm(p + "self_attn.k_norm.weight", hd)

    def mlp(p):
        norm(p + "input_layernorm.weight", D)
        norm(p + "post_attention_layernorm.weight", D)
        mat(p + "mlp.gate_proj.weight", FF, D)
        mat(p + "mlp.up_proj.weight", FF, D)
        mat(p + "mlp.down_proj.weight", D, FF)

    out["model.embed_tokens.weight"] = rnd.uniform((n_vocab, D), std=EMBD_STD)
    norm("model.norm.weight", D, mean=HEAD_NORM_MEAN - 1.0, std=0.02)
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        mlp(p)
        if kind == "full_attention":
            attention(p)
        else:
            q = p + "linear_attn."
            mat(q + "in_proj_qkv.weight", conv_dim, D)
            mat(q + "in_proj_z.weight", Hv * dv, D)
            mat(q + "in_proj_b.weight", Hv, D)
            mat(q + "in_proj_a.weight", Hv, D)
            out[q + "conv1d.weight"] = rnd.uniform((conv_dim, 1, K), std=0.5)
            out[q + "dt_bias"] = rnd.uniform((Hv,), std=0.5, mean=-2.0)
            out[q + "A_log"] = rnd.uniform((Hv,), std=0.5, mean=1.0)
            out[q + "norm.weight"] = rnd.uniform((dv,), std=0.1, mean=1.0)   # gated norm: not zero-centred
            mat(q + "out_proj.weight", D, Hv * dv)
    # the MTP block: fc([enorm(embedding); hnorm(h)]) -> one full-attention layer -> norm -> shared head
    mat("mtp.fc.weight", D, 2 * D)
    norm("mtp.pre_fc_norm_embedding.weight", D)
    norm("mtp.pre_fc_norm_hidden.weight", D)
    norm("mtp.norm.weight", D, mean=HEAD_NORM_MEAN - 1.0, std=0.02)
    mlp("mtp.layers.0.")
    attention("mtp.layers.0.")
    return out


def write_checkpoint(d: Path, seed: int) -> dict:
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    sys.path.insert(0, str(ROOT))
    from tests.qwen35_models import MERGES, QWEN_CHATML, qwen_vocab

    tokens, types, _ = qwen_vocab()
    V = len(tokens)
    special = {t for t, ty in zip(tokens, types) if ty != 1}
    base = {t: i for i, t in enumerate(tokens) if t not in special}
    assert sorted(base.values()) == list(range(len(base)))   # specials come last
    tk = Tokenizer(models.BPE(vocab=base, merges=[tuple(m.split(" ")) for m in MERGES]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=t.startswith("<|"), normalized=False)
                           for t in tokens[len(base):]])
    assert all(tk.token_to_id(t) == i for i, t in enumerate(tokens))
    tk.save(str(d / "tokenizer.json"))
    ids = {t: i for i, t in enumerate(tokens)}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": QWEN_CHATML,
        "model_max_length": 4096}, indent=1))
    cfg = dict(CONFIG, architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", vocab_size=V,
               rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True,
               rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [3, 3, 2], "mrope_interleaved": True},
               hidden_act="silu", bos_token_id=None, eos_token_id=ids["<|im_end|>"],
               pad_token_id=ids["<|endoftext|>"], torch_dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    tensors = hf_tensors(CONFIG, V, seed)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return cfg


# --------------------------------------------------------------------------- 2. llama.cpp's converter
def convert(src: Path, llama_src: Path, out: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py steps, as a library; only the pre-tokenizer name is forced."""
    sys.path.insert(0, str(llama_src))
    sys.path.insert(0, str(llama_src / "gguf-py"))
    import gguf
    import torch
    from conversion import ModelBase, get_model_architecture, get_model_class

    assert Path(gguf.__file__).is_relative_to(llama_src), f"gguf imported from {gguf.__file__}"
    logging.basicConfig(level=logging.WARNING)
    with torch.inference_mode():
        hparams = ModelBase.load_hparams(src, False)
        arch = get_model_architecture(hparams, None)
        cls = get_model_class(arch)
        cls.get_vocab_base_pre = lambda self, tokenizer: "qwen35"   # hash of a real tokenizer only
        model = cls(src, gguf.LlamaFileType.ALL_F32, out)
        model.write()


# --------------------------------------------------------------------------- 3. llama.cpp's quantizer
def quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {src}")


# --------------------------------------------------------------------------- 4. llama.cpp's outputs
def _no_log(level, text, user_data):
    return None


_QUIET = None


class Llama:
    """The model loaded with its MTP block, a target context and an MTP context (llama.cpp C API)."""

    def __init__(self, path: Path, n_ctx: int = 128):
        import llama_cpp as L

        self.L = L
        L.llama_log_set(_QUIET, ctypes.c_void_p())
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.load_mtp = True
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        if L.llama_model_n_layer_nextn(self.model) != 1:
            raise SystemExit(f"{path}: llama.cpp sees {L.llama_model_n_layer_nextn(self.model)} nextn layers")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_embd = L.llama_model_n_embd(self.model)
        # llama-ext.h (C++ linkage): the nextn embeddings switches and getters
        lib = L.llama_cpp._lib
        self._set_nextn = lib["_Z26llama_set_embeddings_nextnP13llama_contextbb"]
        self._set_nextn.argtypes, self._set_nextn.restype = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None
        self._get_nextn_ith = lib["_Z30llama_get_embeddings_nextn_ithP13llama_contexti"]
        self._get_nextn_ith.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        self._get_nextn_ith.restype = ctypes.POINTER(ctypes.c_float)
        self.n_ctx = n_ctx

    def context(self, mtp: bool):
        L = self.L
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = self.n_ctx, 64, 64
        cp.n_threads = cp.n_threads_batch = 2
        cp.n_seq_max = 1
        if mtp:
            cp.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SystemExit("llama.cpp could not create the context")
        # the target: h for every row (unmasked); the MTP context: for the rows with outputs
        self._set_nextn(ctx, True, mtp)
        return ctx

    def process(self, ctx, tokens, p0: int, h=None):
        """Feed tokens at positions p0.. (with h rows as the MTP state); logits and h of every row."""
        L = self.L
        b = L.llama_batch_ext_init(ctx)
        keep = []
        for i, t in enumerate(tokens):
            idx = L.llama_batch_ext_add_token(b, 0, int(t))
            assert idx == i, idx
            pos = (L.llama_pos * 4)(p0 + i, 0, 0, 0)
            keep.append(pos)
            assert L.llama_batch_ext_set_pos(b, idx, pos)
            if h is not None:
                row = np.ascontiguousarray(h[i], dtype=np.float32)
                keep.append(row)
                e = L.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
                assert L.llama_batch_ext_set_embd_token(b, idx, e)
            assert L.llama_batch_ext_set_output_logits(b, idx, True)
        rc = L.llama_process(ctx, L.LLAMA_PROCESS_TYPE_DECODE, b)
        L.llama_batch_ext_free(b)
        if rc != 0:
            raise SystemExit(f"llama_process failed ({rc})")
        logits = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), (self.n_vocab,)).copy()
                           for i in range(len(tokens))])
        hs = np.stack([np.ctypeslib.as_array(self._get_nextn_ith(ctx, i), (self.n_embd,)).copy()
                       for i in range(len(tokens))])
        return logits.astype(np.float32), hs.astype(np.float32)

    def tokenize(self, text: str) -> list[int]:
        L = self.L
        vocab = L.llama_model_get_vocab(self.model)
        buf = (L.llama_token * 512)()
        n = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 512, False, True)
        assert n > 0
        return list(buf[:n])

    def free(self, ctx):
        self.L.llama_free(ctx)


def reference(path: Path, out: Path, name: str) -> dict:
    """llama.cpp's trunk and MTP outputs on the prompt (see the module docstring)."""
    lm = Llama(path)
    text_ids = lm.tokenize(PROMPT_TEXT)
    prompt = text_ids[:N_PROMPT]
    assert len(prompt) == N_PROMPT, len(text_ids)
    tgt = lm.context(mtp=False)
    trunk_logits, trunk_h = lm.process(tgt, prompt, 0)
    lm.free(tgt)
    # the MTP block at position p: (h_{p-1}, x_p), h_{-1} = 0 (common/speculative.cpp's first pending_h)
    h_in = np.vstack([np.zeros((1, lm.n_embd), np.float32), trunk_h[:-1]])
    res: dict = {"text_ids": text_ids, "prompt": prompt}
    modes = {}
    for mode in ("batch", "single"):
        ctx = lm.context(mtp=True)
        if mode == "batch":
            logits, hs = lm.process(ctx, prompt, 0, h_in)
        else:
            rows = [lm.process(ctx, prompt[p : p + 1], p, h_in[p : p + 1]) for p in range(N_PROMPT)]
            logits, hs = np.vstack([r[0] for r in rows]), np.vstack([r[1] for r in rows])
        modes[mode] = (logits, hs)
        if mode == "batch":
            # a chained draft from the end of the prompt: x_P = the target's greedy token after the prompt
            # with h_{P-1}; then each drafted token with the MTP block's own output hidden state
            tok, h, p = int(np.argmax(trunk_logits[-1])), trunk_h[-1:], N_PROMPT
            chain_ids, chain_logits, chain_h = [tok], [], []
            for _ in range(N_CHAIN):
                lg, h = lm.process(ctx, [tok], p, h)
                chain_logits.append(lg[0])
                chain_h.append(h[0])
                tok, p = int(np.argmax(lg[0])), p + 1
                chain_ids.append(tok)
            res["chain_ids"] = chain_ids       # the fed token, then the MTP's greedy drafts
            np.save(out / f"{name}.chain_logits.npy", np.stack(chain_logits))
            np.save(out / f"{name}.chain_h.npy", np.stack(chain_h))
        lm.free(ctx)
    np.save(out / f"{name}.trunk_logits.npy", trunk_logits)
    np.save(out / f"{name}.trunk_h.npy", trunk_h)
    np.save(out / f"{name}.mtp_logits.npy", modes["batch"][0])
    np.save(out / f"{name}.mtp_h.npy", modes["batch"][1])
    res["llama_mtp_single_vs_batch"] = {"logits": float(np.abs(modes["single"][0] - modes["batch"][0]).max()),
                                        "h": float(np.abs(modes["single"][1] - modes["batch"][1]).max())}
    res["trunk_logit_std"] = float(trunk_logits.std())
    res["mtp_logit_std"] = float(modes["batch"][0].std())
    res["mtp_top1_agrees_with_trunk_next"] = int(sum(
        int(np.argmax(modes["batch"][0][p])) == int(np.argmax(trunk_logits[p])) for p in range(N_PROMPT)))
    return res


# --------------------------------------------------------------------------- driver
def tensor_types(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("llama_cpp_src", type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args(argv)
    import llama_cpp

    global _QUIET
    _QUIET = llama_cpp.llama_log_callback(_no_log)   # kept alive for the process
    src = a.llama_cpp_src.resolve()
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{src}: no convert_hf_to_gguf.py there")
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.suffix in (".npy", ".gguf") or p.name == "manifest.json":
            p.unlink()   # (README.md stays)
    manifest: dict = {
        "about": "tiny qwen35 with an MTP block, converted by llama.cpp; regenerate with "
                 "tools/make_qwen35_mtp_fixture.py LLAMA_CPP_SRC",
        "llama_cpp_python": llama_cpp.__version__, "seed": a.seed, "hf_config": CONFIG,
        "embd_std": EMBD_STD, "head_norm_mean": HEAD_NORM_MEAN,
        "prompt_text": PROMPT_TEXT, "n_prompt": N_PROMPT, "n_chain": N_CHAIN,
        "rows": {"trunk_logits/trunk_h": "the target after x_p (h: output_norm'ed, llama.cpp's h_nextn)",
                 "mtp_logits/mtp_h": "the MTP block fed (h_{p-1}, x_p) at position p, h_{-1} = 0 "
                                     "(h: its shared_head_norm'ed output)",
                 "chain_logits/chain_h": "draft steps after the prompt: chain_ids[i] fed at position "
                                         "n_prompt + i with the previous step's MTP h (the first: trunk_h[-1])"},
        "files": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        hf.mkdir()
        write_checkpoint(hf, a.seed)
        f32 = out / "tiny-mtp-f32.gguf"
        convert(hf, src, f32)
        q8 = out / "tiny-mtp-q8_0.gguf"
        quantize(f32, q8, 7)   # LLAMA_FTYPE_MOSTLY_Q8_0
        for name, path in (("f32", f32), ("q8_0", q8)):
            res = reference(path, out, name)
            manifest.setdefault("prompt", res.pop("prompt"))
            manifest.setdefault("text_ids", res.pop("text_ids"))
            res.pop("prompt", None)
            res.pop("text_ids", None)
            manifest["files"][name] = dict(file=path.name, sha256=sha256_file(path), tensor_types=tensor_types(path),
                                           **res)
            print(name, json.dumps(manifest["files"][name]), flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
