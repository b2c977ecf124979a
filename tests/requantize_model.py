"""Requantize a GGUF to Q8_0 with the `gguf` package's reference quantizer (for tests that need
a second format of the default model, e.g. Q4_1 drafting for Q8_0). Every quantized 2-D tensor
is dequantized and quantized again to Q8_0; metadata is copied (file_type set to Q8_0).
tools/requantize.py does the same with llama.cpp's quantizer for the benchmarks."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

_FLOATS = (Q.F32, Q.F16, Q.BF16)


def _value(field):
    kind = field.types[0]
    if kind == V.ARRAY:
        sub = field.types[-1]
        if sub == V.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data], sub
        return [field.parts[i].tolist()[0] for i in field.data], sub
    if kind == V.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8"), None
    return field.parts[field.data[0]].tolist()[0], None


def requantize_q8_0(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    r = gguf.GGUFReader(str(src))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val, sub = _value(field)
        if name == "general.file_type":
            val = 7   # LLAMA_FTYPE_MOSTLY_Q8_0
        w.add_key_value(name, val, field.types[0], sub_type=sub)
    for t in r.tensors:
        qtype = Q(int(t.tensor_type))
        if qtype in _FLOATS or len(t.shape) < 2 or qtype == Q.Q8_0:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=qtype if qtype not in (Q.F32,) else None)
            continue
        x = gguf.quants.dequantize(np.asarray(t.data), qtype)
        w.add_tensor(t.name, gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
