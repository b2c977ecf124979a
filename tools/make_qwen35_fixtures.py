#!/usr/bin/env python
"""Tiny qwen35 GGUF fixtures and llama.cpp's reference outputs on them.

    PYTHONPATH=. /work/devvenv/bin/python tools/make_qwen35_fixtures.py
        [--out tests/fixtures/qwen35] [--llama-python /work/llamavenv/bin/python]
    PYTHONPATH=. /work/devvenv/bin/python tools/make_qwen35_fixtures.py --bench-4b /path/qwen35-4b-shaped.gguf

What it does (the default run):
1. writes the tiny F32 model (tests/qwen35_models.py: D=256, 3 DeltaNet + 1 gated-attention
   layer, Hk=2 != Hv=4, ~290-token byte-level vocabulary with the Qwen control tokens) to a
   temporary directory. It is not committed: the tests rewrite it bit for bit and check its
   weights digest against manifest.json.
2. requantizes it with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize) to
   Q8_0 and to Q4_K_M (Q4_K/Q5_K/Q6_K mix chosen by llama.cpp); those two files are committed.
3. runs llama.cpp (llama-cpp-python, n_threads=2, logits_all) on each file: a 40-token prompt
   fed (a) in one batch, (b) one token at a time, (c) in 4 chunks of 10, then 24 greedy steps.
   Per file and mode it stores `<name>.<mode>.logits.npy`: float32 (40 + 23, V), the logits
   after every fed token (the prompt, then each greedy token but the last), and in
   manifest.json the prompt, the greedy ids, the top1-top2 margins and the file digests.
4. does 1-3 for seeds 0, 1, ... (--seeds) and keeps the best-conditioned one (see make_fixtures);
   --seed N rebuilds one seed directly (the committed fixtures: --seed 29, reproduced bit for bit).

With --bench-4b PATH it instead writes a Qwen3.5-4B-shaped file (true 4B widths and 248320
vocabulary, 8 layers = 6 DeltaNet + 2 attention, random weights) as F16 next to PATH,
quantizes it to Q4_K_M at PATH with llama.cpp and deletes the F16 file. Not committed.

llama-cpp-python lives in its own venv (--llama-python); this script re-runs itself there for
the steps that need it (`--llama-quantize`, `--llama-reference`), which import only numpy and
llama_cpp.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "qwen35"
DEFAULT_LLAMA_PY = "/work/llamavenv/bin/python"

N_PROMPT = 40
N_GEN = 24
CHUNKS = 4
EMBD_SCALE = 0.2
# Logit scale. A random model is chaotic under activation quantization: a value within ~1e-6 of a
# rounding boundary of a Q8_0/Q8_K block flips with any change of float summation order, one flip
# moves this D=256 model's logits by ~10% of their spread, and flips travel through the recurrent
# state and the KV cache. With logits of std 3 (output_norm ~1), llama.cpp's own batch vs chunked
# runs of the Q4_K_M file differ by 0.07-0.1, and a correct engine lands anywhere in 0.1-0.4.
# output_norm ~0.2 gives a logit std of ~0.65: the 0.1 tolerance then holds for a correct engine
# even with perturbed arithmetic (see _reference_diff), while dropping the activation quantization
# still fails it (0.16 on Q8_0, 0.47 on Q4_K_M).
OUTPUT_NORM_MEAN = 0.2
PROMPT_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "Write the story of the wind and the sea in three short lines.<|im_end|>\n"
               "<|im_start|>assistant\n<think>\n")
QUANTS = {"q8_0": 7, "q4_k_m": 15}  # llama_ftype
# On top of llama.cpp's own Q4_K_M recipe, the mix reported for a published Qwen3.5-4B Q4_K_M
# (reference §2.6): DeltaNet attn_qkv/ssm_out Q5_K, ssm_alpha/ssm_beta Q8_0. One file then has
# F32, Q4_K, Q5_K, Q6_K and Q8_0 tensors.
TYPE_OVERRIDES = {"q4_k_m": [("attn_qkv", 13), ("ssm_out", 13), ("ssm_alpha", 8), ("ssm_beta", 8)]}
MODES = ("batch", "single", "chunks")
PERTURBED_RUNS, PERTURBATION = 6, 1e-6  # see _reference_diff
SAFE_MARGIN = 0.05  # a greedy step whose top1-top2 logit margin is below this is a near tie


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- llama.cpp side
def llama_quantize(src: str, dst: str, ftype: int, overrides: str = "") -> None:
    """overrides: "pattern=type_id,..." (llama-quantize's --tensor-type)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    pairs = [o.split("=") for o in overrides.split(",") if o]
    if pairs:
        arr = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()
        for i, (pat, ty) in enumerate(pairs):
            arr[i].pattern = pat.encode()
            arr[i].type = int(ty)
        arr[len(pairs)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {src}")


def llama_reference(model: str, out_dir: str, name: str) -> None:
    """Run the three feeding modes; write <name>.<mode>.logits.npy and print a JSON summary."""
    import numpy as np
    from llama_cpp import Llama

    def load():
        return Llama(model, n_ctx=128, n_batch=64, n_ubatch=64, n_threads=2, n_threads_batch=2,
                     logits_all=True, verbose=False, seed=0)

    llm = load()
    text_ids = llm.tokenize(PROMPT_TEXT.encode(), add_bos=False, special=True)
    if len(text_ids) < N_PROMPT:
        raise SystemExit(f"prompt text gives only {len(text_ids)} tokens")
    prompt = list(text_ids[:N_PROMPT])
    summary = {"text_ids": list(map(int, text_ids)), "prompt": prompt, "modes": {}}
    for mode in MODES:
        llm = load()
        if mode == "batch":
            llm.eval(prompt)
        elif mode == "single":
            for t in prompt:
                llm.eval([t])
        else:
            step = N_PROMPT // CHUNKS
            for s in range(0, N_PROMPT, step):
                llm.eval(prompt[s : s + step])
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
    """Leading greedy steps where all llama.cpp modes agree and the top1-top2 margin is > SAFE_MARGIN."""
    modes = list(entry["modes"].values())
    n = 0
    for i in range(N_GEN):
        if len({m["generated"][i] for m in modes}) != 1 or min(m["margins"][i] for m in modes) <= SAFE_MARGIN:
            break
        n += 1
    return n


def build(out: Path, llama_py: str, seed: int, verbose: bool = True) -> dict:
    """Write the quantized fixtures, llama.cpp's logits and manifest.json for one seed into out."""
    import numpy as np

    from tests.qwen35_models import Qwen35Config, config_dict, weights_digest, write_qwen35

    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen35Config(embd_scale=EMBD_SCALE, output_norm_mean=OUTPUT_NORM_MEAN)
    llama_version = run_llama(llama_py, "--llama-version").strip()
    manifest = {
        "about": "tiny qwen35 fixtures; regenerate with tools/make_qwen35_fixtures.py",
        "llama_cpp_python": llama_version,
        "config": config_dict(cfg), "seed": seed,
        "prompt_text": PROMPT_TEXT, "n_prompt": N_PROMPT, "n_gen": N_GEN, "chunks": CHUNKS,
        "logits_rows": "logits after each fed token: the prompt, then the greedy tokens but the last",
        "fixtures": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "tiny-f32.gguf"
        write_qwen35(f32, cfg, seed=seed)
        manifest["f32_weights_digest"] = weights_digest(f32)
        files = {"f32": f32}
        for qname, ftype in QUANTS.items():
            dst = out / f"tiny-{qname}.gguf"
            ov = ",".join(f"{p}={t}" for p, t in TYPE_OVERRIDES.get(qname, []))
            run_llama(llama_py, "--llama-quantize", str(f32), str(dst), str(ftype), ov)
            files[qname] = dst
        for name, path in files.items():
            stdout = run_llama(llama_py, "--llama-reference", str(path), str(out), name)
            summary = json.loads(next(l for l in stdout.splitlines() if l.startswith("JSON:"))[5:])
            manifest.setdefault("prompt", summary["prompt"])
            manifest.setdefault("text_ids", summary["text_ids"])
            assert manifest["prompt"] == summary["prompt"]
            entry = {"file": None if name == "f32" else path.name,
                     "sha256": None if name == "f32" else sha256_file(path),
                     "tolerance": 0.02 if name == "f32" else 0.1,
                     "modes": summary["modes"]}
            if name != "f32":
                entry["tensor_types"] = _tensor_types(path)
            entry["safe_steps"] = _safe_steps(entry)
            entry["numpy_reference_max_abs_diff"] = _reference_diff(path, out, name, summary)
            ref = np.load(out / f"{name}.batch.logits.npy")
            entry["llama_mode_spread"] = {
                m: float(np.abs(np.load(out / f"{name}.{m}.logits.npy") - ref).max()) for m in MODES[1:]}
            manifest["fixtures"][name] = entry
            if verbose:
                marg = {m: round(v["min_margin"], 4) for m, v in summary["modes"].items()}
                print(f"{name}: safe greedy steps {entry['safe_steps']}/{N_GEN}, min top1-top2 margin {marg}, "
                      f"llama.cpp mode spread vs batch {entry['llama_mode_spread']}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _reference_diff(path: Path, out: Path, name: str, summary: dict) -> float:
    """Max |logits - llama.cpp| of tools/qwen35_reference.py (numpy emulation of llama.cpp's arithmetic)."""
    import numpy as np

    sys.path.insert(0, str(HERE.parent))
    from qwen35_reference import Qwen35Reference

    worst = 0.0
    ref_model = Qwen35Reference(path)
    for mode, m in summary["modes"].items():
        want = np.load(out / f"{name}.{mode}.logits.npy")
        # exact emulation, then with every matmul output perturbed by 1e-6 relative (more than any
        # other float summation order would): the worst of those bounds what a correct engine sees
        for k in range(1 + (PERTURBED_RUNS if mode == "batch" else 0)):
            ref_model.set_noise(PERTURBATION if k else 0.0, seed=k)
            ref_model.reset()
            got = ref_model.forward(summary["prompt"] + m["generated"][:-1])
            worst = max(worst, float(np.abs(got - want).max()))
    return worst


def _score(m: dict):
    """Well conditioned first (the perturbed numpy emulations within 90% of the tolerance), then the
    most greedy steps clear of near ties, then the smallest worst-case emulation error."""
    rel = max(f["numpy_reference_max_abs_diff"] / f["tolerance"] for f in m["fixtures"].values())
    return (rel <= 0.9, min(f["safe_steps"] for f in m["fixtures"].values()), -round(rel, 2))


def make_fixtures(out: Path, llama_py: str, seeds: int, seed: int | None = None) -> None:
    """Try `seeds` seeds; keep the best conditioned (see _score).

    A random model is chaotic under activation quantization: a value that lands within ~1e-6 of a
    rounding boundary of a Q8_0/Q8_K block flips with any change of summation order, and the flip
    travels through the recurrent state and the KV cache. Some seeds have such a cascade early in
    the sequence; they would measure luck rather than the engine. The numpy emulation
    (tools/qwen35_reference.py, independent of the engine's model code) tells them apart.
    """
    import shutil

    best = None if seed is None else ((True, N_GEN, 0), seed)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds if best is None else 0):
            d = Path(tmp) / str(seed)
            m = build(d, llama_py, seed, verbose=False)
            score = _score(m)
            print(f"seed {seed}: safe greedy steps {[f['safe_steps'] for f in m['fixtures'].values()]}, "
                  f"numpy emulation max|d| {[round(f['numpy_reference_max_abs_diff'], 4) for f in m['fixtures'].values()]}",
                  flush=True)
            if best is None or score > best[0]:
                best = (score, seed)
            if score[0] and score[1] == N_GEN:
                break
        seed = best[1]
        print(f"using seed {seed}")
        if out.exists():
            for p in out.iterdir():
                p.unlink()
        build(out, llama_py, seed)
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


def _tensor_types(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in r.tensors:
        k = t.tensor_type.name
        counts[k] = counts.get(k, 0) + 1
    return counts


def make_bench(path: Path, llama_py: str) -> None:
    from tests.qwen35_models import QWEN35_4B, QWEN35_4B_VOCAB, write_qwen35

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".f16.tmp")
    t0 = time.time()
    print(f"writing F16 4B-shaped model to {tmp} ...", flush=True)
    write_qwen35(tmp, QWEN35_4B, seed=1, n_vocab=QWEN35_4B_VOCAB, mat_dtype="f16")
    print(f"  {tmp.stat().st_size / 1e9:.2f} GB in {time.time() - t0:.0f}s; quantizing to Q4_K_M ...", flush=True)
    try:
        run_llama(llama_py, "--llama-quantize", str(tmp), str(path), str(QUANTS["q4_k_m"]))
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.0f}s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seeds", type=int, default=30, help="seeds to try for the tiny model (default 30)")
    ap.add_argument("--seed", type=int, help="use this seed (no search; the committed fixtures: 29)")
    ap.add_argument("--llama-python", default=DEFAULT_LLAMA_PY)
    ap.add_argument("--bench-4b", type=Path, metavar="PATH", help="write the 4B-shaped benchmark file instead")
    ap.add_argument("--llama-quantize", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    ap.add_argument("--llama-reference", nargs=3, metavar=("MODEL", "OUTDIR", "NAME"), help=argparse.SUPPRESS)
    ap.add_argument("--llama-version", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.llama_version:
        import llama_cpp

        print(llama_cpp.__version__)
    elif a.llama_quantize:
        q = a.llama_quantize
        llama_quantize(q[0], q[1], int(q[2]), q[3] if len(q) > 3 else "")
    elif a.llama_reference:
        llama_reference(*a.llama_reference)
    elif a.bench_4b:
        make_bench(a.bench_4b, a.llama_python)
    else:
        make_fixtures(a.out, a.llama_python, a.seeds, a.seed)


if __name__ == "__main__":
    main()
