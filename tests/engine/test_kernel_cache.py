"""Compiled kernels go to the user's cache folder, never beside the package (read-only installs)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.kernel_cache import kernel_cache_dir, use_user_cache_dir

REPO = Path(__file__).resolve().parents[2]


def test_cache_dir_follows_deltatalk_cache_dir_and_keeps_a_users_numba_cache_dir(tmp_path):
    env = {"DELTATALK_CACHE_DIR": str(tmp_path / "c")}
    assert use_user_cache_dir(env) == str(tmp_path / "c" / "numba") == env["NUMBA_CACHE_DIR"]
    mine = {"NUMBA_CACHE_DIR": "/somewhere/else", "DELTATALK_CACHE_DIR": str(tmp_path)}
    assert use_user_cache_dir(mine) == "/somewhere/else"
    # the tests' isolated DELTATALK_HOME does not move it (test processes share compiled kernels)
    assert kernel_cache_dir({"DELTATALK_HOME": str(tmp_path)}) == kernel_cache_dir({})


def test_this_process_caches_in_the_user_folder():
    import numba

    assert numba.config.CACHE_DIR == os.environ["NUMBA_CACHE_DIR"]
    assert not Path(numba.config.CACHE_DIR).resolve().is_relative_to(REPO.resolve())


@pytest.mark.slow
def test_read_only_install_compiles_into_the_cache_folder(tiny_llama_path, tmp_path):
    """The engine copied to a read-only folder, as a system or pipx install: a tiny generation
    (with the warm-up) writes nothing beside the package and fills the cache folder."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "engine", site / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(p.relative_to(site) for p in site.rglob("*"))
    for p in [site, *site.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(site), DELTATALK_CACHE_DIR=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1")
    code = ("import sys, engine\nassert engine.__file__.startswith(sys.argv[1]), engine.__file__\n"
            "from engine.loader import load_model\nfrom engine.warmup import warm_up\n"
            "from engine.generate import stream_generate\nfrom engine.sampling import make_sampler\n"
            "m = load_model(sys.argv[2], n_ctx=64)\nwarm_up(m.model)\n"
            "print([r.token for r in stream_generate(m.model, m.tokenizer, [5, 6], m.model.make_cache(), "
            "make_sampler(0.0), max_tokens=2)])")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(site), str(tiny_llama_path)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1800)  # compiles every kernel afresh
        assert r.returncode == 0, r.stderr[-2000:]
        assert sorted(p.relative_to(site) for p in site.rglob("*")) == before
        cached = list((tmp_path / "cache" / "numba").rglob("*.nbi"))
        assert len(cached) > 10, cached
    finally:
        for p in [site, *site.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
