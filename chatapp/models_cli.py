"""`deltatalk models`: every GGUF file discovery finds, with what it is and whether it runs.

Headers are read by discovery's worker process (bounded time and memory per file), so a
hostile file in a scanned folder costs one row, never a hang or a traceback.
"""

from __future__ import annotations

import json

from chatapp.discovery import human_bytes
from chatapp.model_headers import scan


def cmd_models(args) -> int:
    from chatapp.config import Config
    from chatapp.paths import models_dir

    config = Config.load()
    d = config.get("discover") or {}
    entries = list(scan(models_dir(), config.model_folders, huggingface=d.get("huggingface", True),
                        lmstudio=d.get("lmstudio", True), ollama=d.get("ollama", True)))
    if args.json:
        print(json.dumps([{"path": str(e.path), "size_bytes": e.size, "source": e.source, "name": e.name,
                           "arch": e.arch, "quant": e.quant, "context": e.context, "supported": e.supported,
                           "readable": e.readable, "reason": e.reason} for e in entries]))
        return 0
    models = [e for e in entries if e.readable]
    if not models:
        print(f"no GGUF files in {models_dir()} (run `deltatalk fetch` for the default model)")
    for e in entries:
        status = "supported" if e.supported else e.reason
        print(f"{human_bytes(e.size):>9}  {e.arch:<8} {e.quant:<7} {e.path}  [{status}]")
    if entries:
        ok = sum(1 for e in models if e.supported)
        broken = len(entries) - len(models)
        print(f"{len(models)} GGUF file(s), {ok} supported"
              + (f"; {broken} other file(s) are not readable GGUF files" if broken else ""))
    return 0
