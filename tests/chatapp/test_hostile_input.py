"""Hostile and mistaken input through the real command, one test per class of input.

Each runs `deltatalk` in a subprocess and checks: one line on stderr, no traceback, the right
exit code (2 usage, 1 runtime), bounded time (the subprocess timeout) and bounded memory
(peak RSS <= a normal tiny run's peak + the file + 300 MB).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.gguf_file import GGUFFile
from tests.gguf_fuzz import Layout, _duplicate_key, _overlap
from tests.tiny_models import byte_vocab, write_tiny_llama

REPO = Path(__file__).resolve().parents[2]
TIME_LIMIT = 10.0
HEADROOM = 300 << 20
N_TOKENS = len(byte_vocab()[0])
# Runs the command and writes its own peak RSS (bytes) to $PEAK_FILE, whatever happens.
WRAPPER = ("import os, sys, resource\nfrom chatapp.cli import main\ntry:\n    rc = main(sys.argv[1:])\nfinally:\n"
           "    open(os.environ['PEAK_FILE'], 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))\n"
           "sys.exit(rc)")


def run_cli(tmp_path, *args, env=None, timeout=TIME_LIMIT):
    peak = tmp_path / "peak.txt"
    full_env = {**os.environ, "PEAK_FILE": str(peak), "DELTATALK_HOME": str(tmp_path / "home"), **(env or {})}
    r = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=REPO, env=full_env, capture_output=True,
                       timeout=timeout)
    return r.returncode, r.stderr.decode("utf-8", "replace"), int(peak.read_text())


@pytest.fixture(scope="module")
def normal_peak(tiny_llama_path, tmp_path_factory) -> int:
    """Peak RSS of an ordinary 2-token run on the tiny model: the baseline for the memory bound."""
    rc, err, peak = run_cli(tmp_path_factory.mktemp("normal"), "run", "-m", str(tiny_llama_path), "-p", "hi",
                            "--max-tokens", "2", "--json", timeout=300)  # may compile kernels on a fresh cache
    assert rc == 0, err
    return peak


def assert_one_line(rc, err, peak, want_rc, *fragments, bound=None):
    lines = err.strip().splitlines()
    assert rc == want_rc, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    if bound is not None:
        assert peak < bound, f"peak RSS {peak} >= {bound}"


USAGE = [
    (["--top-p", "2"], "(0, 1]"), (["--top-p", "0"], "(0, 1]"), (["--top-p", "nan"], "(0, 1]"),
    (["--min-p", "1"], "[0, 1)"), (["--top-k", "-5"], ">= 0"), (["--repeat-penalty", "0"], "(0, inf)"),
    (["--repeat-penalty", "nan"], "(0, inf)"), (["--seed", "-1"], "0.."), (["--temp", "-1"], "[0, inf)"),
    (["--temp", "inf"], "[0, inf)"), (["--ctx", "-5"], "16..1048576"), (["--ctx", "1"], "16..1048576"),
    (["--ctx", str(10**9)], "16..1048576"), (["--max-tokens", "0"], "1..1048576"),
    (["--max-tokens", "-1"], "1..1048576"), (["--threads", "0"], "1..1024"),
    (["--logits-out", "/nonexistent-folder/x.npy"], "does not exist"),
]


@pytest.mark.parametrize("extra,fragment", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_out_of_range_arguments_name_the_range(tiny_llama_path, tmp_path, extra, fragment):
    assert_one_line(*run_cli(tmp_path, "run", "-m", str(tiny_llama_path), "-p", "hi", *extra), 2,
                    extra[0], fragment)


@pytest.mark.parametrize("kind", ["dir", "empty", "fifo", "missing"])
def test_model_path_must_be_a_regular_file(tmp_path, kind):
    target = {"dir": str(tmp_path), "empty": "", "missing": str(tmp_path / "nope.gguf"),
              "fifo": str(tmp_path / "pipe.gguf")}[kind]
    if kind == "fifo":
        os.mkfifo(target)  # opening it would block forever: must be refused without opening
    rc, err, peak = run_cli(tmp_path, "run", "-m", target, "-p", "hi")
    assert_one_line(rc, err, peak, 2, "-m/--model")


@pytest.mark.parametrize("extra,fragment", [(["--pp", "a"], "--pp"), (["--tg", "0"], "--tg"),
                                            (["--repeats", "0"], "1..1000")])
def test_bench_arguments(tiny_llama_path, tmp_path, extra, fragment):
    assert_one_line(*run_cli(tmp_path, "bench", "-m", str(tiny_llama_path), *extra), 2, fragment)


@pytest.mark.parametrize("flag", ["-p", "--system"])
def test_invalid_utf8_on_the_command_line(tiny_llama_path, tmp_path, flag):
    args = [b"run", b"-m", str(tiny_llama_path).encode(), b"-p", b"hi"]
    args = args[:3] + [flag.encode(), b"caf\xe9 \xff"] + ([] if flag == "-p" else args[3:])
    assert_one_line(*run_cli(tmp_path, *args), 2, "not valid UTF-8")


@pytest.mark.parametrize("content,fragment", [
    ('{"steps": [{"user": "a\\ud800b"}]}', "lone surrogate"),
    ('{"steps": [{"user": "a", "max_tokens": true}]}', "max_tokens"),
    ('{"steps": [{"user": "a", "max_tokens": 0}]}', "max_tokens"),
])
def test_bad_script_values(tiny_llama_path, tmp_path, content, fragment):
    script = tmp_path / "s.json"
    script.write_text(content)
    assert_one_line(*run_cli(tmp_path, "run", "-m", str(tiny_llama_path), "--script", str(script), "--json"),
                    2, fragment)


def test_invalid_utf8_script_file(tiny_llama_path, tmp_path):
    script = tmp_path / "s.json"
    script.write_bytes(b'{"steps": [{"user": "\xff"}]}')
    assert_one_line(*run_cli(tmp_path, "run", "-m", str(tiny_llama_path), "--script", str(script)), 2,
                    "not valid UTF-8")


def test_ctx_beyond_the_models_training_context(tiny_llama_path, tmp_path):
    assert_one_line(*run_cli(tmp_path, "run", "-m", str(tiny_llama_path), "-p", "hi", "--ctx", "4096"), 2,
                    "training context is 256")


def _hostile(tmp_path, kind) -> Path:
    """A tiny model made hostile in one way."""
    p = tmp_path / f"{kind}.gguf"
    if kind in ("vocab-shorter", "vocab-longer"):  # the token list vs the embedding's rows
        return write_tiny_llama(p, n_vocab_rows=300 if kind == "vocab-shorter" else 200)
    base = write_tiny_llama(tmp_path / "base.gguf")
    data = base.read_bytes()
    lay = Layout.of(data)
    rng = np.random.default_rng(0)
    if kind == "duplicate-key":
        data = _duplicate_key(data, lay, rng)[1]
    elif kind == "overlap":
        data = _overlap(data, lay, rng)[1]
    elif kind == "huge-array":  # the token list claims 2^60 entries
        pos = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8
        data = data[:pos] + struct.pack("<Q", 1 << 60) + data[pos + 8:]
    elif kind == "wrong-dtype":  # llama.block_count stored as f32 instead of an integer
        pos = data.index(b"llama.block_count") + len(b"llama.block_count")
        data = data[:pos] + struct.pack("<I", 6) + data[pos + 4:]
    elif kind == "nan-weights":  # output norm weights at float32's max: every logit overflows to inf - inf = NaN
        with GGUFFile(base) as gf:
            t = gf.tensors["output_norm.weight"]
            off, n = t.offset, t.nbytes
        data = data[:off] + np.full(n // 4, 3e38, np.float32).tobytes() + data[off + n:]
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("kind,fragment", [
    ("vocab-shorter", f"the vocabulary has {N_TOKENS} tokens but token_embd.weight has 300 rows"),
    ("vocab-longer", f"the vocabulary has {N_TOKENS} tokens but token_embd.weight has 200 rows"),
    ("duplicate-key", "appears twice"), ("overlap", "overlap"), ("huge-array", "implausible"),
    ("wrong-dtype", "block_count"),
])
def test_hostile_model_files(tmp_path, normal_peak, kind, fragment):
    p = _hostile(tmp_path, kind)
    rc, err, peak = run_cli(tmp_path, "run", "-m", str(p), "-p", "hi", "--json")
    assert_one_line(rc, err, peak, 1, p.name, fragment, bound=normal_peak + p.stat().st_size + HEADROOM)


@pytest.mark.parametrize("temp", ["0", "0.8"])
def test_non_finite_logits_are_one_line(tmp_path, normal_peak, temp):
    p = _hostile(tmp_path, "nan-weights")
    rc, err, peak = run_cli(tmp_path, "run", "-m", str(p), "-p", "hi", "--temp", temp, "--json")
    assert_one_line(rc, err, peak, 1, "no finite logits", bound=normal_peak + p.stat().st_size + HEADROOM)


def test_empty_prompt_is_a_usage_error(tiny_llama_path, tmp_path, normal_peak):
    rc, err, peak = run_cli(tmp_path, "run", "-m", str(tiny_llama_path), "--raw", "-p", "", "--json")
    assert_one_line(rc, err, peak, 2, "prompt is empty", bound=normal_peak + HEADROOM)


def test_prompt_longer_than_the_context(tiny_llama_path, tmp_path, normal_peak):
    rc, err, peak = run_cli(tmp_path, "run", "-m", str(tiny_llama_path), "--ctx", "16", "--raw", "-p",
                            "the " * 40, "--json")
    assert_one_line(rc, err, peak, 1, "context holds 16", bound=normal_peak + HEADROOM)


def test_offline_fetch_is_one_line(tmp_path):
    env = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull, "DELTATALK_MODELS_DIR": str(tmp_path / "models")}
    rc, err, peak = run_cli(tmp_path, "fetch", env=env, timeout=60)  # pip itself starts in ~2-5 s
    assert_one_line(rc, err.split("Downloading the default model")[-1].split("\n", 1)[-1], peak, 1,
                    "could not download")


def test_unexpected_errors_are_one_line_and_debug_shows_them(monkeypatch, capsys):
    from chatapp import cli

    def boom(args):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(cli, "_dispatch", boom)
    monkeypatch.setenv("DELTATALK_HOME", "/nonexistent-dt-home")  # logging may fail: still one line
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: unexpected" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "models"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["models"]) == 130
    assert "Traceback" not in capsys.readouterr().err
