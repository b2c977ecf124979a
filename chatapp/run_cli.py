"""`deltatalk run`: one prompt (or a replayed conversation script) answered on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from chatapp import arg_types as A
from chatapp.cli_common import chat_messages, make_speculator_from_args, open_model, sampling_from_args


MAX_SCRIPT_BYTES = 16 << 20  # a conversation script; more is a mistake, not a script


def load_script(path: Path) -> dict:
    """Read and check a conversation script; raise ValueError with what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SCRIPT_BYTES + 1)
        if len(raw) > MAX_SCRIPT_BYTES:
            raise ValueError(f"{path}: larger than {MAX_SCRIPT_BYTES >> 20} MB")
        script = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except (OSError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(script, dict) or not isinstance(script.get("steps"), list) or not script["steps"]:
        raise ValueError(f'{path}: expected {{"system": "...", "steps": [...]}} with at least one step')
    if not isinstance(script.get("system", ""), str):
        raise ValueError(f"{path}: system must be a string")
    _check_utf8(path, "system", script.get("system", ""))
    for i, step in enumerate(script["steps"]):
        kinds = [k for k in ("user", "regenerate", "edit") if k in step] if isinstance(step, dict) else []
        if len(kinds) != 1:
            raise ValueError(f'{path}: step {i} must have exactly one of "user", "regenerate", "edit"')
        if kinds[0] in ("user", "edit"):
            if not isinstance(step[kinds[0]], str):
                raise ValueError(f"{path}: step {i}: {kinds[0]} must be a string")
            _check_utf8(path, f"step {i}: {kinds[0]}", step[kinds[0]])
        mt = step.get("max_tokens", 1)
        if isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= A.MAX_TOKENS_LIMIT:
            raise ValueError(f"{path}: step {i}: max_tokens must be an integer in 1..{A.MAX_TOKENS_LIMIT}")
    return script


def _check_utf8(path: Path, where: str, text: str):
    """JSON's \\ud800 escapes make lone surrogates: text no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{path}: {where}: a lone surrogate at character {e.start} is not valid text") from None


def cmd_script(args, loaded, settings, script: dict) -> int:
    """Replay a checked script (load_script) through one ChatSession; report each step."""
    from engine.session import ChatSession

    session = ChatSession(loaded)
    messages = [{"role": "system", "content": script["system"]}] if script.get("system") else []
    for i, step in enumerate(script["steps"]):
        if "user" in step:
            messages.append({"role": "user", "content": step["user"]})
            label = step["user"]
        else:
            if messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if not messages or messages[-1]["role"] != "user":
                print(f"deltatalk: step {i}: nothing to regenerate or edit yet", file=sys.stderr)
                return 2
            if "edit" in step:
                messages[-1] = {"role": "user", "content": step["edit"]}
            label = step.get("edit", "(regenerate)")
        if not args.json:
            print(f"\n» {label}", file=sys.stderr)
        ids, pieces, last = [], [], None
        for r in session.reply(messages, settings, max_tokens=step.get("max_tokens", args.max_tokens)):
            ids.append(r.token)
            pieces.append(r.text)
            last = r
            if not args.json and r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
        text = "".join(pieces)
        messages.append({"role": "assistant", "content": text})
        st, stats = session.last_turn, session.stats()
        row = {
            "step": i, "kind": next(k for k in ("user", "regenerate", "edit") if k in step), "mode": st.mode,
            "prompt_tokens": st.prompt_tokens, "reused_tokens": st.reused_tokens,
            "prefilled_tokens": st.prefilled_tokens, "dropped_messages": st.dropped_messages,
            "restored_from": st.restored_from,
            "ttft_s": last.ttft_s if last else 0.0, "prompt_tps": last.prompt_tps if last else 0.0,
            "decode_tps": last.decode_tps if last else 0.0, "generated_token_ids": ids, "text": text,
            "stop_reason": last.finish_reason if last else None, "state_bytes": stats["state_bytes"],
            "kv_bytes": stats["kv_bytes"], "checkpoint_bytes": stats["checkpoint_bytes"],
        }
        if args.json:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            dropped = f", dropped {st.dropped_messages} old messages" if st.dropped_messages else ""
            print(f"\n[{st.mode}: reused {st.reused_tokens} of {st.prompt_tokens} prompt tokens, prefilled "
                  f"{st.prefilled_tokens}{dropped} | ttft {row['ttft_s'] * 1000:.0f} ms | "
                  f"{row['decode_tps']:.1f} tok/s | state {stats['state_bytes'] / 1e6:.2f} MB, "
                  f"KV {stats['kv_bytes'] / 1e6:.2f} MB, checkpoints {stats['checkpoint_bytes'] / 1e6:.2f} MB]",
                  file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    import numpy as np

    from engine import runtime
    from engine.session import ChatSession

    settings = sampling_from_args(args)
    if args.script is not None:
        try:  # checked before the model is loaded: a usage error costs nothing
            script = load_script(args.script)
        except ValueError as e:
            print(f"deltatalk: {e}", file=sys.stderr)
            return 2
    loaded, _ = open_model(args, quiet=args.json)
    if args.script is not None:
        return cmd_script(args, loaded, settings, script)
    session = ChatSession(loaded)
    session.speculator = make_speculator_from_args(args, loaded)
    tok = loaded.tokenizer
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
        if any(i >= loaded.model.n_vocab for i in prompt):
            print(f"deltatalk: token ids must be in 0..{loaded.model.n_vocab - 1}", file=sys.stderr)
            return 2
    elif args.raw:
        prompt = tok.encode(args.prompt, add_special=True, parse_special=True)
    else:
        prompt = session.render(chat_messages(args.system, args.prompt))

    logits_rows = []
    generated, pieces = [], []
    last = None
    for r in session.generate(prompt, settings, max_tokens=args.max_tokens, keep_logits=args.logits_out is not None):
        generated.append(r.token)
        pieces.append(r.text)
        if args.logits_out is not None:
            logits_rows.append(np.asarray(r.logits, dtype=np.float32))
        if not args.json and r.text:
            sys.stdout.write(r.text)
            sys.stdout.flush()
        last = r
    if args.logits_out is not None:
        np.save(args.logits_out, np.stack(logits_rows) if logits_rows else np.zeros((0, loaded.model.n_vocab), np.float32))
    result = {
        "model": str(loaded.path),
        "prompt_token_ids": list(map(int, prompt)),
        "generated_token_ids": list(map(int, generated)),
        "text": "".join(pieces),
        "stop_reason": last.finish_reason if last else "cancelled",
        "prompt_tokens": len(prompt),
        "prompt_tps": last.prompt_tps if last else 0.0,
        "ttft_s": last.ttft_s if last else 0.0,
        "generated_tokens": len(generated),
        "decode_tps": last.decode_tps if last else 0.0,
        "peak_rss_bytes": runtime.peak_rss_bytes(),
        "threads": runtime.threads_in_use()["threads"],
        "thread_policy": runtime.threads_in_use(),   # count, maximum, policy, decode steps per count
    }
    if session.speculator is not None:
        result["speculation"] = dict(mode=args.speculate, **session.speculator.stats.to_dict())
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{result['prompt_tokens']} prompt tokens, {result['prompt_tps']:.1f} tok/s prefill, "
              f"ttft {result['ttft_s'] * 1000:.0f} ms | {result['generated_tokens']} tokens, "
              f"{result['decode_tps']:.1f} tok/s decode | stop: {result['stop_reason']}]", file=sys.stderr)
        if "speculation" in result:
            sp = result["speculation"]
            print(f"[speculate {sp['mode']}: {sp['accepted']}/{sp['drafted']} drafted tokens accepted "
                  f"({100 * sp['acceptance']:.0f}%), {sp['tokens_per_step']:.2f} tokens per step]", file=sys.stderr)
    return 0
