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
