"""`deltatalk serve` as a real subprocess for tests: started on a free loopback port, stopped by its pid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 300      # the first start may compile the kernels
ENTRY = "import sys; from chatapp.cli import main; sys.exit(main())"


def deltatalk_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", ENTRY, *args]


class ServeProcess:
    def __init__(self, model: Path, *extra: str, api_key: str | None = None, env: dict | None = None):
        self.model, self.extra, self.api_key = Path(model), list(extra), api_key
        self.env = {**os.environ, **(env or {})}
        self.env.pop("DELTATALK_API_KEY", None)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.lines: list[str] = []

    def __enter__(self) -> ServeProcess:
        args = ["serve", "-m", str(self.model), "--host", "127.0.0.1", "--port", "0", *self.extra]
        if self.api_key:
            args += ["--api-key", self.api_key]
        self.proc = subprocess.Popen(deltatalk_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=self.env)
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
                if m and not self.url:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(START_TIMEOUT_S) or not self.url:
            self.__exit__(None, None, None)
            raise RuntimeError("deltatalk serve did not start:\n" + "\n".join(self.lines[-20:]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:   # the socket listens before uvicorn serves: wait for /health
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError("deltatalk serve does not answer /health")

    @property
    def base(self) -> str:
        return self.url[: -len("/v1")]

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
