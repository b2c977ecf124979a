"""`--speculate` on `run` and `bench`: same tokens as plain decoding, the counts reported, and
clear one-line refusals (a draft model with another vocabulary, mtp on a file without an MTP block)."""

from __future__ import annotations

import json

from pathlib import Path

from chatapp.cli import main

MTP_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen35_mtp" / "tiny-mtp-q8_0.gguf"


def _json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    (line,) = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    return json.loads(line)


def test_run_speculate_lookup_same_ids_and_counts(tiny_llama_path, capsys):
    # a prompt that repeats itself, so lookup finds drafts
    args = ["run", "-m", str(tiny_llama_path), "--raw", "-p", "the cat the cat the cat the cat the cat",
            "--temp", "0", "--max-tokens", "24", "--json", "--ctx", "128"]
    plain = _json(capsys, *args)
    spec = _json(capsys, *args, "--speculate", "lookup", "--draft-max", "4")
    assert spec["generated_token_ids"] == plain["generated_token_ids"]
    sp = spec["speculation"]
    assert sp["mode"] == "lookup" and sp["steps"] > 0 and 0 <= sp["accepted"] <= sp["drafted"]
    assert "speculation" not in plain


def test_run_speculate_draft_same_model_accepts_everything(tiny_llama_path, capsys):
    args = ["run", "-m", str(tiny_llama_path), "-p", "hello", "--temp", "0", "--max-tokens", "16", "--json",
            "--ctx", "128"]
    plain = _json(capsys, *args)
    spec = _json(capsys, *args, "--speculate", "draft", "--draft", str(tiny_llama_path), "--draft-max", "3")
    assert spec["generated_token_ids"] == plain["generated_token_ids"]
    sp = spec["speculation"]
    assert sp["drafted"] > 0 and sp["accepted"] == sp["drafted"] or plain["stop_reason"] == "stop"


def test_speculate_refusals_are_one_clear_line(tiny_llama_path, capsys, tmp_path):
    from tests.qwen35_models import write_qwen35

    other = write_qwen35(tmp_path / "q.gguf")
    base = ["run", "-m", str(tiny_llama_path), "-p", "x", "--ctx", "64"]
    assert main(base + ["--speculate", "draft", "--draft", str(other)]) != 0
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("deltatalk:")]
    assert len(err) == 1 and "cannot draft" in err[0] and "vocabulary sizes differ" in err[0]
    assert main(base + ["--speculate", "draft"]) != 0
    assert "--draft MODEL" in capsys.readouterr().err
    assert main(base + ["--speculate", "mtp"]) != 0
    out = capsys.readouterr().err
    err = [l for l in out.splitlines() if l.startswith("deltatalk:")]
    assert len(err) == 1 and "needs a Qwen3.5" in err[0] and "is llama" in err[0] and "Traceback" not in out
    # a qwen35 file converted without its MTP block
    assert main(["run", "-m", str(other), "-p", "x", "--ctx", "64", "--speculate", "mtp"]) != 0
    out = capsys.readouterr().err
    err = [l for l in out.splitlines() if l.startswith("deltatalk:")]
    assert len(err) == 1 and "has no MTP block" in err[0] and "Traceback" not in out


def test_run_speculate_mtp_same_ids_and_counts(capsys):
    args = ["run", "-m", str(MTP_FIXTURE), "--raw", "-p", "the wind and the sea", "--temp", "0",
            "--max-tokens", "24", "--json", "--ctx", "128"]
    plain = _json(capsys, *args)
    spec = _json(capsys, *args, "--speculate", "mtp", "--draft-max", "3")
    assert spec["generated_token_ids"] == plain["generated_token_ids"]
    sp = spec["speculation"]
    assert sp["mode"] == "mtp" and sp["steps"] > 0 and sp["drafted"] > 0 and 0 <= sp["accepted"] <= sp["drafted"]
    assert set(sp) >= {"drafted", "accepted", "acceptance", "tokens_per_step"}


def test_bench_speculate_mtp_json(capsys):
    r = _json(capsys, "bench", "-m", str(MTP_FIXTURE), "--speculate", "mtp", "--tg", "8", "--repeats", "1",
              "--json", "--ctx", "512")
    assert r["speculate"] == "mtp" and set(r["results"]) == {"code", "rewrite", "prose"}
    for v in r["results"].values():
        assert v["identical_ids"] and v["speculation"]["steps"] > 0


def test_bench_speculate_json(tmp_path, capsys):
    from tests.tiny_models import write_tiny_llama

    # the bench's code prompt is ~400 byte tokens: a tiny llama trained for 1024
    path = write_tiny_llama(tmp_path / "tiny-1k.gguf", n_ctx_train=1024)
    r = _json(capsys, "bench", "-m", str(path), "--speculate", "lookup", "--tg", "8", "--repeats", "1",
              "--json", "--ctx", "512")
    assert set(r["results"]) == {"code", "rewrite", "prose"}
    for v in r["results"].values():
        assert v["identical_ids"] and v["plain_tps"] > 0 and v["speculative_tps"] > 0
        assert all(int(T) > 1 and c > 0 for T, c in v["pass_cost"].items())
