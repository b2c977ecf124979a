"""Requantize a GGUF with llama.cpp's own quantizer (llama-cpp-python, the `peer` extra), for
the benchmarks: the default SmolLM2-135M Q4_1 as Q8_0 and Q4_K_M.

    python tools/requantize.py [-m SmolLM2-135M-Instruct.Q4_1.gguf] [--types Q8_0,Q4_K_M] [-o models/]

Writes models/<stem>.<TYPE>.gguf (git-ignored). The source is already quantized, so this
needs --allow-requantize semantics (set below); the results are real llama.cpp files of
those types, which is what the speed comparison needs (not a better model).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# llama_ftype values (llama.h)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="source GGUF (default: the default model)")
    ap.add_argument("--types", default="Q8_0,Q4_K_M")
    ap.add_argument("-o", "--out-dir", default=str(ROOT / "models"))
    args = ap.parse_args(argv)
    import llama_cpp

    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from chatapp.default_model import ensure_default_model

        args.model = str(ensure_default_model(say=lambda s: None))
    src = Path(args.model)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = src.name.split(".")[0]
    for t in args.types.split(","):
        t = t.strip().upper()
        if t not in FTYPES:
            raise SystemExit(f"unknown type {t}; known: {', '.join(FTYPES)}")
        dst = out_dir / f"{stem}.{t}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[t]
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed for {t} (code {rc})")
        print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
