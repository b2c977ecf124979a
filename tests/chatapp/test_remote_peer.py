"""`deltatalk run --endpoint` against llama.cpp's own server (llama-cpp-python's `server` extra).

Skipped unless a Python with `llama_cpp.server` is at hand: this one (the `peer` extra) or the
one named by DELTATALK_PEER_PYTHON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.chatapp.serve_process import deltatalk_cmd

pytestmark = pytest.mark.slow


def _peer_python() -> str | None:
    for py in (os.environ.get("DELTATALK_PEER_PYTHON"), sys.executable):
        if py and subprocess.run([py, "-c", "import llama_cpp.server.app"], capture_output=True,
                                 timeout=120).returncode == 0:
            return py
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_endpoint_against_llama_cpp_server(default_model_path, tmp_path):
    py = _peer_python()
    if py is None:
        pytest.skip("llama-cpp-python with its server extra is not installed (peer extra / DELTATALK_PEER_PYTHON)")
    port = _free_port()
    log = open(tmp_path / "llama-server.log", "w")   # a file, not a pipe: its loud log would fill a pipe and stall it
    proc = subprocess.Popen([py, "-m", "llama_cpp.server", "--model", str(default_model_path), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
            assert proc.poll() is None, (tmp_path / "llama-server.log").read_text()[-2000:]
        else:
            pytest.fail("llama.cpp's server did not start: " + (tmp_path / "llama-server.log").read_text()[-2000:])
        r = subprocess.run(deltatalk_cmd("run", "--endpoint", url, "-p", "What is the capital of France?",
                                         "--temp", "0", "--max-tokens", "32", "--json"),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["text"].strip() and out["decode_tps"] > 0 and out["ttft_s"] > 0
        assert out["generated_tokens"] > 1
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
