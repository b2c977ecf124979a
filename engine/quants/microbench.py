"""Kernel micro-benchmark: decode GB/s of weight bytes and prefill GFLOP/s for one shape.

    from engine.quants.microbench import bench_matvec
    bench_matvec("Q4_K", 2560, 9728, repeats=20)
    -> {"type": "Q4_K", "n_out": 2560, "n_in": 9728, "weight_mb": 14.0,
        "decode_gbps": ..., "decode_gbps_hot": ..., "decode_us": ..., "prefill_gflops": ..., "prefill_ms": ..., "threads": 2}

Weights are random blocks with sane fp16 scales (speed does not depend on values).
decode_gbps rotates over enough copies of the weight (runtime.probe_bytes(): twice the
last-level cache, at least 256 MB) that each call streams it from DRAM, as a real decode step
does; decode_gbps_hot reuses one copy (cache-resident).
Both include quantizing the activation (QuantLinear.matvec_into). Medians of `repeats` calls.
The machine is shared: compare numbers taken in one process, interleaved.
"""

from __future__ import annotations

import time

import numpy as np
from gguf import GGMLQuantizationType

from engine.quants.linear import QuantLinear, get_format

# Byte offsets of the fp16 scale fields in each block (the rest may be random).
_FP16_FIELDS = {
    "F16": (), "BF16": (), "F32": (),
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,),
}


def random_blocks(type_name: str, n_out: int, n_in: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks (n_out, row_bytes) with finite, small fp16 scales."""
    fmt = get_format(GGMLQuantizationType[type_name])
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_out, fmt.row_bytes(n_in)), dtype=np.uint8)
    if type_name in ("F32", "F16", "BF16"):
        w = rng.standard_normal((n_out, n_in)).astype(np.float32) * np.float32(0.02)
        if type_name == "F32":
            return w.view(np.uint8).reshape(n_out, -1)
        if type_name == "F16":
            return w.astype(np.float16).view(np.uint8).reshape(n_out, -1)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_out, -1)
    blocks = raw.reshape(n_out, -1, fmt.type_size)
    for o in _FP16_FIELDS[type_name]:
        s = (rng.random(blocks.shape[:2]) * 0.01 + 0.001).astype(np.float16)
        blocks[:, :, o : o + 2] = s.view(np.uint8).reshape(blocks.shape[0], blocks.shape[1], 2)
    return raw


def parallel_overhead_us(repeats: int = 50) -> float:
    """Median cost of entering an almost empty prange region. A few µs normally; on a
    shared VM whose other vCPU is busy elsewhere it can jump to milliseconds, and then
    every kernel call pays it: check this before trusting (or publishing) a number."""
    from engine.quants.simd_kernels import touch_parallel

    a = np.zeros(64, np.float32)
    touch_parallel(a)
    return _median_time(lambda _: touch_parallel(a), range(repeats)) * 1e6


def _median_time(fn, args_seq) -> float:
    ts = []
    for a in args_seq:
        t0 = time.perf_counter()
        fn(a)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench_matvec(type_name: str, n_out: int, n_in: int, repeats: int = 20, prefill_tokens: int = 128,
                 cold_bytes: float | None = None) -> dict:
    import numba

    from engine import runtime

    raw = random_blocks(type_name, n_out, n_in)
    ggml_type = GGMLQuantizationType[type_name]
    cold_bytes = runtime.probe_bytes() if cold_bytes is None else cold_bytes
    n_copies = max(1, min(4096, int(np.ceil(cold_bytes / raw.nbytes))))
    lins = [QuantLinear(raw if i == 0 else raw.copy(), ggml_type, n_in, n_out, name=f"bench{i}")
            for i in range(n_copies)]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n_in).astype(np.float32)
    y = np.empty(n_out, np.float32)
    lins[0].matvec_into(x, y)  # compile / warm
    hot = _median_time(lambda lin: lin.matvec_into(x, y), [lins[0]] * repeats)
    cold = _median_time(lambda lin: lin.matvec_into(x, y), [lins[i % n_copies] for i in range(max(repeats, n_copies))])
    X = rng.standard_normal((prefill_tokens, n_in)).astype(np.float32)
    lins[0].matmul(X)
    pre = _median_time(lambda lin: lin.matmul(X), [lins[0]] * max(3, repeats // 4))
    return {
        "type": type_name, "n_out": n_out, "n_in": n_in, "weight_mb": raw.nbytes / 1e6,
        "decode_gbps": raw.nbytes / cold / 1e9, "decode_gbps_hot": raw.nbytes / hot / 1e9,
        "decode_us": cold * 1e6,
        "prefill_tokens": prefill_tokens, "prefill_gflops": 2.0 * n_out * n_in * prefill_tokens / pre / 1e9,
        "prefill_ms": pre * 1e3, "threads": numba.get_num_threads(),
        "parallel_overhead_us": parallel_overhead_us(),
    }


def main(argv=None):
    import argparse

    import numba

    p = argparse.ArgumentParser(description="deltatalk quant kernel micro-benchmark")
    p.add_argument("shapes", nargs="*", default=["Q4_1:576:1536", "Q4_1:1536:576", "Q8_0:49152:576",
                                                 "Q4_K:2560:9728", "Q6_K:2560:9728"],
                   help="TYPE:n_out:n_in")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    numba.set_num_threads(a.threads)
    ovh = parallel_overhead_us()
    print(f"threads {a.threads}, {numba.threading_layer()} layer, parallel-region entry {ovh:.1f} us"
          + ("  (WARNING: stalls; other load on the machine? numbers unreliable)" if ovh > 100 else ""))
    for s in a.shapes:
        t, n_out, n_in = s.split(":")
        r = bench_matvec(t, int(n_out), int(n_in), a.repeats)
        print(f"{t:6s} {n_out:>6s}x{n_in:<6s} {r['weight_mb']:7.1f} MB  decode {r['decode_gbps']:6.1f} GB/s "
              f"(hot {r['decode_gbps_hot']:6.1f}, {r['decode_us']:8.1f} us)  prefill T={r['prefill_tokens']} "
              f"{r['prefill_gflops']:6.1f} GFLOP/s" + ("  [stalls]" if r["parallel_overhead_us"] > 100 else ""),
              flush=True)


if __name__ == "__main__":
    main()
