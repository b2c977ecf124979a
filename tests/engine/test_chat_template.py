"""engine.chat_template: the GGUF's Jinja template, rendered like HF, sandboxed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, ChatTemplate, fallback_for
from engine.errors import TemplateError


@pytest.fixture(scope="session")
def _model_path(request) -> Path:
    env = os.environ.get("DELTATALK_TEST_MODEL")
    if env:
        return Path(env)
    local = Path("/work/dl/smollm2.gguf")
    if local.exists():
        return local
    return request.getfixturevalue("default_model_path")


@pytest.fixture(scope="session")
def smol_meta(_model_path) -> dict:
    from tools.make_tokenizer_expected import read_meta

    return read_meta(_model_path)


def test_default_model_template_matches_llamacpp_prompt(smol_meta, reference_dir):
    from engine.tokenizer import Tokenizer

    doc = json.loads((reference_dir / "smollm2_q4_1.json").read_text())
    ref = doc["primary"]
    tok = Tokenizer.from_metadata(smol_meta)
    tpl = ChatTemplate(smol_meta["tokenizer.chat_template"], bos_token=tok.decode([tok.bos_id]),
                       eos_token=tok.decode([tok.eos_id]))
    assert not tpl.is_fallback and not tpl.supports_thinking
    text = tpl.render([{"role": "user", "content": doc["user_message"]}], add_generation_prompt=True)
    assert text == ref["prompt_text"]
    assert tok.encode(text, add_special=True, parse_special=True) == ref["prompt_token_ids"]


def test_none_source_is_chatml():
    tpl = ChatTemplate(None, "<s>", "</s>")
    assert tpl.is_fallback and tpl.source == CHATML_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tpl.render(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                "<|im_start|>assistant\n")
    assert tpl.render(msgs, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    assert ChatTemplate("", "", "").is_fallback
    with pytest.raises(ValueError):
        ChatTemplate(None, "", "", fallback="alpaca")


def test_gemma3_without_template_falls_back_to_gemma_turns():
    # gemma-3-270m-q4_k_m.gguf has no tokenizer.chat_template; ChatML would be garbage to it
    assert fallback_for("gemma3") == "gemma" and fallback_for("llama") == fallback_for(None) == "chatml"
    tpl = ChatTemplate(None, "<bos>", "<eos>", fallback=fallback_for("gemma3"))
    assert tpl.is_fallback and tpl.source == GEMMA_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert tpl.render(msgs) == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                                "<start_of_turn>model\nHello.<end_of_turn>\n"
                                "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert tpl.render(msgs[1:2], add_generation_prompt=False) == "<start_of_turn>user\nHi<end_of_turn>\n"


def test_hf_helpers_and_variables():
    src = ("{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|{{ {'k': 'é', 'n': [1, 2]} | tojson(indent=2) }}|"
           "{{ strftime_now('%Y') | length }}|{{ extra_var }}|{{ tools is defined }}|"
           "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}")
    tpl = ChatTemplate(src, "<s>", "</s>")
    out = tpl.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                     tools=[{"name": "f"}], extra_var="X")
    assert out == ('<s>|</s>|[{"name": "f"}]|{\n  "k": "é",\n  "n": [\n    1,\n    2\n  ]\n}|4|X|True|a')


def test_trim_and_lstrip_blocks_like_hf():
    src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}"
    assert ChatTemplate(src).render([{"role": "user", "content": "x"}]) == "U:x\n"


QWEN3_STYLE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "# Tools\n\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\n<tool_response>\n' + content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


def test_qwen3_style_thinking_switch_and_history_rewrite():
    tpl = ChatTemplate(QWEN3_STYLE, "", "<|im_end|>")
    assert tpl.supports_thinking
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    history = ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
               "<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert tpl.render(msgs) == history                          # enable_thinking undefined: thinks
    assert tpl.render(msgs, enable_thinking=True) == history
    assert tpl.render(msgs, enable_thinking=False) == history + "<think>\n\n</think>\n\n"
    # the reasoning of the turn after the last user message is kept
    cont = msgs + [{"role": "assistant", "content": "<think>\nsix\n</think>\n\n6"}]
    assert tpl.render(cont, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nsix\n</think>\n\n6<|im_end|>\n")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    out = tpl.render(msgs, tools=tools)
    assert out.startswith('<|im_start|>system\n# Tools\n\n<tools>\n{"type": "function"')


def test_raise_exception_becomes_template_error():
    tpl = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must "
                       "alternate user/assistant') }}{% endif %}ok", "", "")
    assert tpl.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError) as e:
        tpl.render([{"role": "assistant", "content": "x"}])
    assert "Conversation roles must alternate user/assistant" in str(e.value)
    assert "\n" not in str(e.value)


def test_syntax_error_raises_on_render_not_on_construction():
    tpl = ChatTemplate("{% for m in messages %}{{ m.content }", "", "")
    assert tpl.error and "syntax error" in tpl.error
    with pytest.raises(TemplateError) as e:
        tpl.render([{"role": "user", "content": "x"}])
    assert "syntax error" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
    "{{ messages[0].update({'content': 'pwned'}) }}",
    "{{ cycler.__init__.__globals__.os.popen('echo hacked').read() }}",
    "{{ undefined_thing.attr }}",
    "{{ 1 / 0 }}",
])
def test_sandbox_and_runtime_errors_become_template_error(src):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError):
        ChatTemplate(src, "", "").render(msgs)
    assert msgs == [{"role": "user", "content": "x"}]


def test_undefined_values_are_lenient_like_hf():
    tpl = ChatTemplate("{{ nothing }}{% if message_tool_calls %}T{% endif %}"
                       "{% for m in messages %}{{ m.tool_calls or '' }}{% endfor %}|", "", "")
    assert tpl.render([{"role": "user", "content": "x"}]) == "|"


# -- limits: a hostile template ends quickly, in bounded memory, with the limit named ----------
HOSTILE_TEMPLATES = {
    "nested_range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "lipsum": "{{ lipsum(10**6) }}",
    "str_repeat": "{{ 'x' * 10**9 }}",
    "list_repeat": "{{ ([1] * 10**9) | length }}",
    "center_method": "{{ 'a'.center(10**9) }}",
    "ljust_method": "{{ 'a'.ljust(10**9) }}",
    "center_filter": "{{ 'a' | center(10**9) }}",
    "to_bytes": "{{ (1).to_bytes(10**9, 'big') }}",
    "tojson_indent": "{{ messages | tojson(indent=10**8) }}",
    "format_width": "{{ '{:>1000000000}'.format(1) }}",
    "percent_width": "{{ '%1000000000d' % 1 }}",
    "percent_star": "{{ '%*d' % (1000000000, 1) }}",
    "format_filter": "{{ '%1000000000s' | format('a') }}",
    "indent_filter": "{{ 'a' | indent(10**9, true) }}",
    "replace_empty": "{{ ('a' * 1000).replace('', 'b' * 100000) }}",
    "join_filter": "{{ range(100000) | join('x' * 100000) }}",
    "batch_fill": "{{ [1] | batch(10**9, 'x') | list }}",
    "int_power": "{{ 7 ** 100000000 }}",
    "int_squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "tilde_doubling": "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}"
                      "{% endfor %}",
    "block_set_doubling": "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set y %}{{ ns.x }}{{ ns.x }}"
                          "{% endset %}{% set ns.x = y %}{% endfor %}",
    "output_flood": "{% for i in range(100000) %}{% for j in range(1000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
}

_HOSTILE_RUNNER = r"""
import json, resource, sys
def vm(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from engine.chat_template import ChatTemplate, TemplateLimitError
src = sys.stdin.read()
before = vm('VmRSS')
# a safety net so a regression fails instead of swapping the machine: 2 GB more address space
resource.setrlimit(resource.RLIMIT_AS, (vm('VmSize') + (2 << 30),) * 2)
try:
    ChatTemplate(src).render_strict([{"role": "user", "content": "hi"}])
    outcome = "rendered"
except TemplateLimitError as e:
    outcome = "limit: " + str(e)
except Exception as e:
    outcome = type(e).__name__ + ": " + str(e)
print(json.dumps({"outcome": outcome, "grew": vm('VmHWM') - before}))
"""


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_template_ends_in_bounded_time_and_memory(name):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _HOSTILE_RUNNER], input=HOSTILE_TEMPLATES[name],
                          capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["outcome"].startswith("limit: the chat template went over a limit: "), doc
    assert "\n" not in doc["outcome"]
    assert doc["grew"] < 300 << 20, doc


def test_limit_messages_name_the_limit():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError, match="longer than 2 s"):
        ChatTemplate(HOSTILE_TEMPLATES["nested_range"]).render_strict(msgs)
    with pytest.raises(TemplateError, match=r"'\*' would build 1,000,000,000 characters \(limit 8,388,608\)"):
        ChatTemplate(HOSTILE_TEMPLATES["str_repeat"]).render_strict(msgs)
    with pytest.raises(TemplateError, match="lipsum over 20 paragraphs"):
        ChatTemplate(HOSTILE_TEMPLATES["lipsum"]).render_strict(msgs)


def test_render_leaves_the_thread_trace_as_it_was():
    import sys

    def tracer(frame, event, arg):
        return None

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        ChatTemplate("{{ messages[0].content }}").render([{"role": "user", "content": "x"}])
        with pytest.raises(TemplateError):
            ChatTemplate("{{ 'x' * 10**9 }}").render_strict([])
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(before)


def test_ordinary_sizes_stay_within_the_limits():
    # padding, repetition and joins a real template might use are unaffected
    src = ("{{ '=' * 40 }}|{{ 'a'.center(9) }}|{{ '%5d' % 42 }}|{{ '{:>6}'.format('ab') }}|"
           "{{ [1, 2] * 2 }}|{{ ['a', 'b'] | join(', ') }}|{{ 'x' | indent(2, true) }}|{{ lipsum(1, false)[:5] }}")
    out = ChatTemplate(src).render([])
    assert out == "=" * 40 + "|    a    |   42|    ab|[1, 2, 1, 2]|a, b|  x|" + out.rsplit("|", 1)[1]
    assert len(out.rsplit("|", 1)[1]) == 5


@pytest.mark.parametrize("arch, expected", [
    ("llama", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("qwen35", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("phi3", "<|user|>\nHi<|end|>\n<|assistant|>\n"),
    ("gemma3", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"),
])
def test_template_over_a_limit_falls_back_to_the_architectures_format(arch, expected):
    notices = []
    tpl = ChatTemplate("{{ 'x' * 10**9 }}", "<s>", "</s>", fallback=fallback_for(arch))
    tpl.on_fallback = notices.append
    assert not tpl.is_fallback
    assert tpl.render([{"role": "user", "content": "Hi"}]) == expected
    assert tpl.is_fallback and "'*' would build" in tpl.fallback_reason
    assert len(notices) == 1 and "'*' would build" in notices[0] and "built-in" in notices[0]
    assert tpl.render([{"role": "user", "content": "Hi"}]) == expected  # stays on the fallback
    assert len(notices) == 1


def test_template_errors_other_than_limits_do_not_fall_back():
    tpl = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        tpl.render([{"role": "user", "content": "x"}])
    assert not tpl.is_fallback and tpl.fallback_reason is None
