"""How far llama.cpp itself lands from the stored reference logits on this machine.

The stored vectors (tests/fixtures/llamacpp/) were made by an AVX2 build on another
CPU. This runs the llama.cpp of llama-cpp-python (the `peer` extra, built here) on the same
prompts with flash attention on and off and prints mean/max |Δ|, KL and the top-5 overlap
against the stored vectors and between its own two runs. The parity tests' tolerances
(tests/engine/test_llamacpp_parity.py) come from these figures.

    pip install -e ".[peer]"   (or any venv with llama-cpp-python 0.3.36)
    python tools/llamacpp_spread.py MODEL.gguf [--ours]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REF = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llamacpp"
CASES = {"primary": "smollm2_q4_1_first_logits.f32",
         "alt_builtin_chatml_no_system": "smollm2_q4_1_builtin_first_logits.f32"}


def compare(got: np.ndarray, exp: np.ndarray) -> str:
    def softmax(x):
        e = np.exp(x.astype(np.float64) - x.max())
        return e / e.sum()

    p, q = softmax(exp), softmax(got)
    kl = float((p * (np.log(p) - np.log(q))).sum())
    top = len(set(np.argsort(-got)[:5]) & set(np.argsort(-exp)[:5]))
    d = np.abs(got - exp)
    return f"mean {d.mean():.3f}  max {d.max():.3f}  KL {kl:.4f}  top5 {top}/5"


def llama_cpp_logits(model: str, ids: list[int], flash_attn: bool) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model, n_ctx=512, n_batch=512, n_threads=2, flash_attn=flash_attn, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ours", action="store_true", help="also run deltatalk's engine")
    args = ap.parse_args()
    ref = json.loads((REF / "smollm2_q4_1.json").read_text())
    for case, fname in CASES.items():
        exp = np.fromfile(REF / fname, dtype="<f4")
        ids = ref[case]["prompt_token_ids"]
        on, off = llama_cpp_logits(args.model, ids, True), llama_cpp_logits(args.model, ids, False)
        print(f"{case}:")
        print(f"  llama.cpp here, flash attn on  vs stored: {compare(on, exp)}")
        print(f"  llama.cpp here, flash attn off vs stored: {compare(off, exp)}")
        print(f"  llama.cpp here, on vs off               : {compare(on, off)}")
        if args.ours:
            from engine.loader import load_model

            m = load_model(args.model, n_ctx=512).model
            ours = m.forward(ids, m.make_cache(), logits="last")[-1]
            print(f"  deltatalk vs stored                     : {compare(ours, exp)}")


if __name__ == "__main__":
    main()
