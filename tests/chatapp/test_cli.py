"""`deltatalk run` / `bench` / `models` in-process, on a tiny generated model."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from chatapp.cli import main


def run_json(capsys, *argv) -> list[dict]:
    assert main(list(argv)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_run_json_has_the_stable_fields(tiny_llama_path, capsys):
    (r,) = run_json(capsys, "run", "-m", str(tiny_llama_path), "-p", "hello", "--temp", "0", "--max-tokens", "5",
                    "--json", "--ctx", "128")
    for key in ("prompt_token_ids", "generated_token_ids", "text", "stop_reason", "prompt_tps", "decode_tps",
                "ttft_s", "peak_rss_bytes"):
        assert key in r
    assert r["prompt_token_ids"][0] == 1  # ChatML <|im_start|> from the template
    assert 1 <= len(r["generated_token_ids"]) <= 5 and r["stop_reason"] in ("stop", "length")


def test_prompt_ids_and_logits_out(tiny_llama_path, capsys, tmp_path):
    out = tmp_path / "logits.npy"
    (r,) = run_json(capsys, "run", "-m", str(tiny_llama_path), "--prompt-ids", "1,50,60", "--temp", "0",
                    "--max-tokens", "4", "--json", "--logits-out", str(out), "--ctx", "64")
    assert r["prompt_token_ids"] == [1, 50, 60]
    logits = np.load(out)
    assert logits.shape == (len(r["generated_token_ids"]), 267) and logits.dtype == np.float32
    assert [int(i) for i in logits.argmax(axis=1)] == r["generated_token_ids"]  # greedy


def test_raw_prompt_parses_special_tokens(tiny_llama_path, capsys):
    (r,) = run_json(capsys, "run", "-m", str(tiny_llama_path), "--raw", "-p", "<|im_start|>user", "--temp", "0",
                    "--max-tokens", "1", "--json", "--ctx", "64")
    from engine.loader import load_model

    tok = load_model(tiny_llama_path, n_ctx=64).tokenizer
    assert r["prompt_token_ids"][0] == 1  # the control token, not its characters
    assert tok.decode(r["prompt_token_ids"][1:]) == "user"


def test_script_reports_each_step(tiny_llama_path, capsys, tmp_path):
    script = tmp_path / "conv.json"
    script.write_text(json.dumps({"system": "be brief", "steps": [
        {"user": "one"}, {"user": "two", "max_tokens": 3}, {"regenerate": True}, {"edit": "deux"}]}))
    rows = run_json(capsys, "run", "-m", str(tiny_llama_path), "--script", str(script), "--temp", "0",
                    "--max-tokens", "4", "--json", "--ctx", "256")
    assert [r["mode"] for r in rows] == ["full", "append", "regenerate", "edit"]
    for key in ("prompt_tokens", "reused_tokens", "prefilled_tokens", "ttft_s", "decode_tps", "generated_token_ids",
                "text", "state_bytes", "kv_bytes", "checkpoint_bytes"):
        assert key in rows[0]
    # regenerate on a KV-only model re-feeds the last two prompt tokens (the last then takes the prefill kernels)
    assert rows[1]["reused_tokens"] > 0 and rows[2]["prefilled_tokens"] == 2
    assert len(rows[1]["generated_token_ids"]) <= 3


@pytest.mark.parametrize("content,err", [
    ("{}", "steps"), ('{"steps": [{"user": 1}]}', "must be a string"),
    ('{"steps": [{"user": "a", "edit": "b"}]}', "exactly one"), ("not json", "conv.json"),
])
def test_bad_scripts_are_clear_errors(tiny_llama_path, capsys, tmp_path, content, err):
    script = tmp_path / "conv.json"
    script.write_text(content)
    assert main(["run", "-m", str(tiny_llama_path), "--script", str(script), "--ctx", "64"]) == 2
    assert err in capsys.readouterr().err


def test_bad_model_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(10))
    assert main(["run", "-m", str(bad), "-p", "x"]) == 1   # a runtime error, not a usage error
    err = capsys.readouterr().err
    assert "bad.gguf" in err and "Traceback" not in err


def test_bench_json(tiny_llama_path, capsys):
    (r,) = run_json(capsys, "bench", "-m", str(tiny_llama_path), "--pp", "16", "--tg", "4", "--repeats", "2",
                    "--json", "--ctx", "64")
    assert set(r["results"]) == {"pp16", "tg4"}
    assert r["results"]["tg4"]["median_tps"] > 0 and r["threading_layer"] in ("omp", "tbb", "workqueue")
    assert r["bandwidth_bytes_per_s"] > 1e8 and r["decode_bound_tps"] > 0


def test_bench_depth_names_the_tests_and_must_fit_the_context(tiny_llama_path, capsys):
    (r,) = run_json(capsys, "bench", "-m", str(tiny_llama_path), "--pp", "8", "--tg", "4", "--depth", "24",
                    "--repeats", "1", "--json", "--ctx", "64")
    assert set(r["results"]) == {"pp8@d24", "tg4@d24"} and r["depth"] == 24
    assert main(["bench", "-m", str(tiny_llama_path), "--tg", "30", "--depth", "40", "--ctx", "64"]) == 2
    err = capsys.readouterr().err
    assert "--depth 40 + --tg 30 does not fit the context of 64 tokens" in err and "Traceback" not in err


def test_bench_peer_without_llama_cpp_says_how_to_get_it(tiny_llama_path, capsys):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed here")
    assert main(["bench", "-m", str(tiny_llama_path), "--peer", "--ctx", "64", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "--peer-python" in err


FAKE_CRASHING_LLAMA_CPP = """
import os, signal
__version__ = "0.0-crashes"
def llama_print_system_info():
    return b"CPU : SSE3 = 1 | AVX2 = 1 | FMA = 1 | AMX_INT8 = 1 | "
class Llama:   # loads, then dies in its first evaluation as an AMX build did on a Xeon VM
    def __init__(self, *args, **kwargs):
        self._ctx = None
    def n_vocab(self):
        return 32
    def reset(self):
        pass
    def eval(self, tokens):
        os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_bench_peer_that_crashes_says_how_it_ended_without_a_traceback(tiny_llama_path, tmp_path, capsys, monkeypatch):
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text(FAKE_CRASHING_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))   # the peer process imports the stand-in
    assert main(["bench", "-m", str(tiny_llama_path), "--peer", "--peer-python", sys.executable, "--ctx", "64",
                 "--pp", "16", "--tg", "4", "--repeats", "1"]) == 1
    err = capsys.readouterr().err
    assert "llama.cpp stopped during its 16-token prefill (killed by SIGSEGV)" in err
    assert "uses AMX" in err and "CMAKE_ARGS=" in err
    assert "Traceback" not in err and "internal error" not in err


def test_plain_chat_replies_through_the_session_and_reuses_the_cache(tiny_llama_path, capsys, monkeypatch):
    import io
    import re

    model = str(tiny_llama_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
    assert main(["chat", "--plain", "-m", model, "--temp", "0", "--max-tokens", "4", "--ctx", "256"]) == 0
    out = capsys.readouterr()
    turns = [(int(a), int(b)) for a, b in re.findall(r"reused (\d+) of (\d+) prompt tokens", out.err)]
    assert len(turns) == 2 and turns[0][0] == 0
    # the second turn appends to the first: its whole prompt and reply are reused from the cache
    assert turns[0][1] <= turns[1][0] < turns[1][1]
    (first,) = run_json(capsys, "run", "-m", model, "-p", "hello", "--temp", "0", "--max-tokens", "4", "--json",
                        "--ctx", "256")
    replies = out.out.split("\n› ")[1:]          # input() writes its prompt to stdout, before each reply
    assert replies[0].startswith(first["text"])   # the same greedy reply as `run` on the same prompt
