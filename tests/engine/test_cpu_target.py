"""DELTATALK_CPU=avx2 (engine.cpu_target): the kernels compiled as an AVX2 machine would run them,
and the K-quant row kernels kept in 256-bit registers where the host has AVX-512."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import cpu_target, runtime

ROOT = Path(__file__).resolve().parents[2]

# Compiles the Q4_K and Q6_K row kernels in a fresh numba cache, checks them against the numpy
# twin, and reports which instructions their code holds.
PROBE = r"""
import json, numpy as np
from gguf import GGMLQuantizationType as G
from engine.quants import linear, simd
from engine.quants import simd_kernels as sk
from engine.quants.linear import QuantLinear, get_format
rng = np.random.default_rng(0)
worst = 0.0
for t, off in ((G.Q4_K, [0, 2]), (G.Q6_K, [208])):
    fmt = get_format(t)
    raw = rng.integers(0, 256, size=(8, fmt.row_bytes(512)), dtype=np.uint8)
    b = raw.reshape(8, -1, fmt.type_size)
    for o in off:
        b[:, :, o:o + 2] = (rng.normal(size=b.shape[:2]) * 0.05).astype(np.float16).view(np.uint8).reshape(b.shape[:2] + (2,))
    lin = QuantLinear(raw, t, 512, 8)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    act = lin.quantize(x)
    got = lin.matmul_quantized(act)
    want = fmt.matmul_ref(raw, act)
    worst = max(worst, float(np.max(np.abs(got - want) / (np.abs(want) + 1e-3))))
asm = "".join(a for f in (sk.matmul_q4_k, sk.matmul_q6_k) for a in f.inspect_asm().values())
print(json.dumps({"family": linear.KERNEL_FAMILY, "avx2": simd.HAVE_AVX2, "worst": worst,
                  "zmm": "zmm" in asm, "vnni": "vpdpwssd" in asm or "vpdpbusd" in asm,
                  "gfni": "gf2p8" in asm, "evex": "vpternlog" in asm}))
"""


def test_apply_sets_numba_target_and_family():
    env = {"DELTATALK_CPU": "avx2"}
    assert cpu_target.apply(env) == "haswell"
    assert env["NUMBA_CPU_NAME"] == "haswell"
    assert "+avx2" in env["NUMBA_CPU_FEATURES"] and "+f16c" in env["NUMBA_CPU_FEATURES"]
    assert env["DELTATALK_NO_VNNI"] == "1"
    assert cpu_target.describe(env) == "compiled for haswell (DELTATALK_CPU)"


def test_apply_keeps_a_users_numba_cpu_and_ignores_unknown_values(capsys):
    env = {"DELTATALK_CPU": "avx2", "NUMBA_CPU_NAME": "znver3", "NUMBA_CPU_FEATURES": "+avx2"}
    assert cpu_target.apply(env) == "znver3"
    assert env["NUMBA_CPU_FEATURES"] == "+avx2"
    env = {"DELTATALK_CPU": "avx1024"}
    assert cpu_target.apply(env) is None
    assert "NUMBA_CPU_NAME" not in env and "DELTATALK_NO_VNNI" not in env
    assert "supported: avx2" in capsys.readouterr().err
    assert cpu_target.apply({}) is None and cpu_target.describe({}) == ""


def _probe(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU") and k != "DELTATALK_NO_VNNI"}
    env.update(NUMBA_CACHE_DIR=str(tmp_path / "numba"), PYTHONPATH=str(ROOT), **extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_avx2 = pytest.mark.skipif("avx2" not in runtime.cpu_features(), reason="no AVX2 on this CPU")


@pytest.mark.slow
@needs_avx2
def test_avx2_target_compiles_no_instruction_an_avx2_cpu_lacks(tmp_path):
    r = _probe(tmp_path, DELTATALK_CPU="avx2")
    assert r["family"] == "avx2" and r["avx2"]
    assert r["worst"] < 1e-4
    assert not (r["zmm"] or r["vnni"] or r["gfni"] or r["evex"]), r


@pytest.mark.slow
@pytest.mark.skipif("avx512f" not in runtime.cpu_features(), reason="the host has no AVX-512")
def test_k_quant_rows_stay_in_256_bit_registers_on_avx512_hosts(tmp_path):
    """A 512-bit op in a row kernel shuts port 1's vector units for a while: Q6_K rows were
    ~30% slower from cache while one vpmulld zmm remained (README, Speed)."""
    r = _probe(tmp_path)
    assert r["worst"] < 1e-4
    assert not r["zmm"], r
