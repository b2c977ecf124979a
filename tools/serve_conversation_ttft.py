#!/usr/bin/env python
"""Time to first token over one growing conversation against `deltatalk serve` (or any server).

    .venv/bin/python tools/serve_conversation_ttft.py -m /work/bench-files/qwen35-4b-shaped.gguf [--turns 10]
    .venv/bin/python tools/serve_conversation_ttft.py --url http://127.0.0.1:8080/v1

Starts `deltatalk serve` on the file (unless --url is given), then sends --turns requests with
the `openai` client, each the whole history + the reply + a new question, streamed, and prints
per request: the prompt tokens, cached_tokens, the TTFT measured at the client, and the ratio of
each TTFT to the first. A server that prefills only what is new keeps the ratio near 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import openai

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF file to serve")
    ap.add_argument("--url", help="an already running server's API base")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.url and not args.model:
        ap.error("give -m FILE or --url URL")
    server = None
    if not args.url:
        from tests.chatapp.serve_process import ServeProcess

        server = ServeProcess(args.model, "--ctx", str(args.ctx)).__enter__()
        args.url = server.url
    try:
        c = openai.OpenAI(base_url=args.url, api_key="unused", max_retries=0, timeout=900)
        model = c.models.list().data[0].id
        msgs = [{"role": "system", "content": "You are a patient assistant."}]
        rows = []
        for i in range(args.turns):
            msgs.append({"role": "user", "content": f"Question {i + 1}: tell me one more thing about rivers."})
            t0 = time.perf_counter()
            ttft, parts, usage = None, [], None
            for ch in c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=args.max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
                if ch.usage is not None:
                    usage = ch.usage
                for choice in ch.choices:
                    if choice.delta.content:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        parts.append(choice.delta.content)
            msgs.append({"role": "assistant", "content": "".join(parts)})
            cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else None
            rows.append({"request": i + 1, "prompt_tokens": usage.prompt_tokens if usage else None,
                         "cached_tokens": cached, "ttft_s": ttft or 0.0})
            r = rows[-1]
            if not args.json:
                print(f"{r['request']:>3}  prompt {r['prompt_tokens']:>5}  cached {r['cached_tokens']:>5}  "
                      f"ttft {r['ttft_s'] * 1000:8.0f} ms  x{r['ttft_s'] / rows[0]['ttft_s']:.2f} of the first",
                      flush=True)
        if args.json:
            print(json.dumps(rows))
        else:
            print(f"request {args.turns} / request 1 TTFT: {rows[-1]['ttft_s'] / rows[0]['ttft_s']:.2f}")
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
