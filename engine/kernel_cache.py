"""Where numba keeps compiled kernels: the user's cache folder, never beside the package.

Beside the package (numba's default) is a checkout or site-packages: read-only for a system
or pipx install, where every start would compile again. numba reads NUMBA_CACHE_DIR once, when
it is first imported, so `engine/__init__.py` calls `use_user_cache_dir()` before anything
imports numba. A NUMBA_CACHE_DIR the user set is kept. This module must not import numba.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "deltatalk"


def user_cache_root(env=os.environ) -> Path:
    """$DELTATALK_CACHE_DIR, else <the platform's user cache dir>/deltatalk: what the engine
    may keep between runs (compiled kernels, engine.hugepages' notes).

    DELTATALK_HOME (the tests' isolated home) deliberately does not move it: test processes
    share the compiled kernels instead of compiling everything again per temp home.
    """
    base = env.get("DELTATALK_CACHE_DIR")
    if not base:
        import platformdirs

        base = platformdirs.user_cache_dir(APP)
    return Path(base)


def kernel_cache_dir(env=os.environ) -> Path:
    """user_cache_root()/numba."""
    return user_cache_root(env) / "numba"


def use_user_cache_dir(env=os.environ) -> str:
    """Set NUMBA_CACHE_DIR (unless already set) so numba caches under the user's folder; return it.

    Set in the environment, so child processes (bench peers, test subprocesses) share it.
    """
    if not env.get("NUMBA_CACHE_DIR"):
        env["NUMBA_CACHE_DIR"] = str(kernel_cache_dir(env))
    return env["NUMBA_CACHE_DIR"]
