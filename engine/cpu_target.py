"""DELTATALK_CPU=avx2: compile the kernels as for an AVX2 machine, on a CPU that has more.

The kernel family (engine.quants.linear) picks which kernels run, but numba compiles them for
the host CPU, and LLVM then uses whatever the host has: on an AVX-512 Xeon, the "avx2" family
that DELTATALK_NO_VNNI=1 selects was built with 512-bit multiplies, vpdpwssd (AVX-VNNI),
vgf2p8affineqb (GFNI) and vpternlogq, none of which an AVX2 laptop (Zen 2/3, Intel before Ice
Lake) has. DELTATALK_CPU=avx2 makes numba compile for LLVM's "haswell" (AVX2, FMA, F16C, BMI:
x86-64-v3) and steps the family down to "avx2", so such a machine measures the code an AVX2
machine runs (`deltatalk bench` prints the target). numba reads NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES once, so `engine/__init__.py` calls `apply()` before anything compiles.
NUMBA_CPU_NAME set by the user wins. This module must not import numba.
"""

from __future__ import annotations

import os
import sys

TARGETS = {
    # name -> (LLVM CPU, its features as numba passes them; engine.quants.simd reads "+avx2", "+f16c")
    "avx2": ("haswell", "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+lzcnt,+movbe,+sse4.2"),
}


def apply(env=os.environ) -> str | None:
    """Apply DELTATALK_CPU (set numba's target CPU and the avx2 family); return the LLVM CPU
    compiled for, or None. An unknown value is reported on stderr and ignored."""
    want = env.get("DELTATALK_CPU", "").strip().lower()
    if not want:
        return None
    if want not in TARGETS:
        print(f"deltatalk: DELTATALK_CPU={want!r} ignored; supported: {', '.join(TARGETS)}", file=sys.stderr)
        return None
    cpu, features = TARGETS[want]
    if env.get("NUMBA_CPU_NAME", "") in ("", "host"):
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = cpu, features
    env["DELTATALK_NO_VNNI"] = "1"
    if "numba" in sys.modules:   # imported before the engine: make it read the target again
        from numba.core import config

        config.reload_config()
    return env["NUMBA_CPU_NAME"]


def describe(env=os.environ) -> str:
    """The CPU numba compiles for, when it is not the host ("" otherwise), for bench's output."""
    cpu = env.get("NUMBA_CPU_NAME", "")
    if cpu in ("", "host"):
        return ""
    via = " (DELTATALK_CPU)" if env.get("DELTATALK_CPU") else ""
    return f"compiled for {cpu}{via}"
