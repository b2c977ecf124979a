"""`deltatalk serve` against real clients: the official `openai` SDK and raw HTTP, never a mocked layer.

The server runs as a subprocess on a tiny llama (tests/tiny_models.py) for the protocol, cache,
queue and disconnect tests, and on the default model (slow) for the greedy-text acceptance.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import openai
import pytest

from tests.chatapp.serve_process import ServeProcess, deltatalk_cmd

KEY = "test-key-123"
# A random tiny model repeats its last token under plain greedy decoding; a strong repetition
# penalty (still greedy: deterministic) makes it write varied text.
GREEDY = {"temperature": 0, "extra_body": {"repeat_penalty": 3.0}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("serve") / "tiny-serve.gguf", n_ctx_train=4096)


@pytest.fixture(scope="module")
def server(tiny_model):
    with ServeProcess(tiny_model, "--ctx", "1024", "--queue", "3", "--threads", "1", api_key=KEY) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _model(client) -> str:
    return client.models.list().data[0].id


def _stream_text(stream) -> tuple[str, int, object, str | None]:
    parts, usage, finish = [], None, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    return "".join(parts), len(parts), usage, finish


def test_models_lists_the_served_file(client, tiny_model):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-serve"]
    assert models[0].model_dump()["context_length"] == 1024


def test_errors_are_openai_shaped(server, client):
    model = _model(client)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x" * 3000}])
    assert e.value.body["code"] == "context_length_exceeded"
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(server.url + "/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/chat/completions", content=b"x" * (9 << 20), headers=auth, timeout=60)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(server.url + "/nothing-here", headers=auth)
    assert r.status_code == 404 and "error" in r.json()
    assert server.health()["status"] == "ok"   # still serving


def test_stream_and_non_stream_give_the_same_greedy_text(client):
    model = _model(client)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "the theory of sets"}]
    text, n_chunks, usage, finish = _stream_text(client.chat.completions.create(
        model=model, messages=msgs, max_tokens=24, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert n_chunks >= 5
    assert usage.completion_tokens == 24 and finish == "length"
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, **GREEDY)
    assert full.choices[0].message.content == text and len(set(text)) > 5
    assert full.usage.prompt_tokens == usage.prompt_tokens
    # the same prompt again: all but the last two prompt tokens come from the kept session (two are
    # fed again so the last one takes the prefill kernels, as in an uncached run: the same text)
    assert full.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 2


def test_follow_up_prefills_only_what_is_new(client):
    model = _model(client)
    msgs = [{"role": "user", "content": "a question about rivers"}]
    first = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, **GREEDY)
    p, r = first.usage.prompt_tokens, first.usage.completion_tokens
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "and the sea?"}]
    second = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= p + r - 4
    assert second.usage.prompt_tokens > cached


def test_stop_string_cuts_the_reply(client):
    model = _model(client)
    msgs = [{"role": "user", "content": "stop strings"}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=30, **GREEDY)
    text = full.choices[0].message.content
    at = next(i for i in range(len(text) // 3, len(text) - 1) if not text[i:i + 2].isspace() and text[i].strip())
    stop = text[at: at + 2]
    cut = client.chat.completions.create(model=model, messages=msgs, max_tokens=30, stop=[stop], **GREEDY)
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed, _, _, finish = _stream_text(client.chat.completions.create(
        model=model, messages=msgs, max_tokens=30, stop=stop, stream=True, **GREEDY))
    assert streamed == text[: text.find(stop)] and finish == "stop"


def test_disconnect_mid_stream_frees_the_engine(server, client):
    model = _model(client)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "go on and on"}],
                                            temperature=1.0, seed=3, max_tokens=900, stream=True)
    got = 0
    for ch in stream:
        got += bool(ch.choices and ch.choices[0].delta.content)
        if got >= 5:
            break
    assert server.health()["busy"]
    stream.close()
    deadline = time.monotonic() + 10
    while server.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    h = server.health()
    assert not h["busy"]
    assert h["last"]["finish"] == "cancelled"
    assert h["last"]["completion_tokens"] < 900
    # from the server noticing the disconnect to the kernel thread being free again
    assert h["last"]["cancel_to_free_s"] < 0.5


def test_twenty_concurrent_clients_are_answered_or_told_busy(server, client):
    model = _model(client)
    outcomes: dict[int, object] = {}

    def one(i):
        try:
            r = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"client {i}"}], temperature=0, max_tokens=40)
            outcomes[i] = ("ok", r.parse().choices[0].message.content)
        except openai.APIStatusError as e:
            outcomes[i] = (e.status_code, e.response.headers.get("retry-after"))
        except Exception as e:  # noqa: BLE001
            outcomes[i] = ("error", repr(e))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hangs"
    kinds = [o[0] for o in outcomes.values()]
    assert len(outcomes) == 20 and set(kinds) <= {"ok", 503}, outcomes
    assert kinds.count("ok") >= 4          # one running + --queue 3 waiting are always admitted
    assert all(o[1] and int(o[1]) >= 1 for o in outcomes.values() if o[0] == 503)   # Retry-After
    after = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "still there?"}],
                                           max_tokens=5)
    assert after.choices[0].finish_reason in ("stop", "length")
    h = server.health()
    assert not h["busy"] and h["requests"] == 0


def test_run_endpoint_gives_the_local_text(server, tiny_model):
    args = ["-p", "the endpoint test", "--temp", "0", "--repeat-penalty", "3", "--max-tokens", "20", "--json"]
    local = subprocess.run(deltatalk_cmd("run", "-m", str(tiny_model), "--ctx", "1024", *args),
                           capture_output=True, text=True, timeout=300)
    remote = subprocess.run(deltatalk_cmd("run", "--endpoint", server.url, "--api-key-env", "DT_TEST_KEY", *args),
                            capture_output=True, text=True, timeout=300, env={**server.env, "DT_TEST_KEY": KEY})
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    lo, re_ = json.loads(local.stdout), json.loads(remote.stdout)
    assert re_["text"] == lo["text"] and len(set(lo["text"])) > 5
    assert re_["prompt_tokens"] == lo["prompt_tokens"] and not re_["prompt_tokens_estimated"]
    assert re_["generated_tokens"] == lo["generated_tokens"] and not re_["generated_tokens_estimated"]
    assert re_["decode_tps"] > 0 and re_["ttft_s"] > 0
    assert set(lo) - {"model"} <= set(re_)    # the same --json fields as a local run


def test_run_endpoint_errors_are_one_line(server):
    r = subprocess.run(deltatalk_cmd("run", "--endpoint", server.url, "-p", "hi"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "refused the request (401)" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(deltatalk_cmd("run", "--endpoint", server.url, "-m", "nope", "--api-key-env", "DT_TEST_KEY",
                                     "-p", "hi"), capture_output=True, text=True, timeout=120,
                       env={**server.env, "DT_TEST_KEY": KEY})
    assert r.returncode == 1 and "no model 'nope'" in r.stderr


def test_speculative_serving_gives_the_same_greedy_text(client, tiny_model):
    """serve --speculate lookup: one Speculator per kept conversation, the same greedy text as
    the plain server, its counts in /health; a pair that cannot work is refused at start."""
    msgs = [{"role": "user", "content": "one two three four, one two three four, one two three"}]
    want = client.chat.completions.create(model=_model(client), messages=msgs, max_tokens=40, **GREEDY)
    with ServeProcess(tiny_model, "--ctx", "1024", "--threads", "1", "--speculate", "lookup", api_key=KEY) as s:
        c = openai.OpenAI(base_url=s.url, api_key=KEY, max_retries=0, timeout=120)
        got = c.chat.completions.create(model=_model(c), messages=msgs, max_tokens=40, **GREEDY)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage.completion_tokens == want.usage.completion_tokens
        spec = s.health()["speculation"]
        assert spec["mode"] == "lookup" and spec["steps"] > 0 and spec["tokens"] == got.usage.completion_tokens - 1
        assert any("--speculate lookup" in line for line in s.lines)
    refused = subprocess.run(deltatalk_cmd("serve", "-m", str(tiny_model), "--port", "0", "--speculate", "mtp"),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if line.startswith("deltatalk:")][-1].count("MTP") >= 1


# -- the default model (slow) --------------------------------------------------------------
@pytest.mark.slow
def test_default_model_greedy_text_equals_run(default_model_path):
    prompt = "What is the capital of France?"
    local = subprocess.run(deltatalk_cmd("run", "-m", str(default_model_path), "-p", prompt, "--temp", "0",
                                         "--max-tokens", "48", "--json"), capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr
    want = json.loads(local.stdout)
    with ServeProcess(default_model_path) as s:
        c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=300)
        model = c.models.list().data[0].id
        msgs = [{"role": "user", "content": prompt}]
        text, n_chunks, usage, _ = _stream_text(c.chat.completions.create(
            model=model, messages=msgs, temperature=0, max_tokens=48, stream=True,
            stream_options={"include_usage": True}))
        assert text == want["text"] and n_chunks >= 5
        assert usage.prompt_tokens == want["prompt_tokens"]
        full = c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=48)
        assert full.choices[0].message.content == want["text"]
        msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
        follow = c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=32)
        assert follow.usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens + usage.completion_tokens - 4
        remote = subprocess.run(deltatalk_cmd("run", "--endpoint", s.url, "-p", prompt, "--temp", "0",
                                              "--max-tokens", "48", "--json"), capture_output=True, text=True,
                                timeout=300)
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout)["text"] == want["text"]
