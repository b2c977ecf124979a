"""The model's own chat template (GGUF `tokenizer.chat_template`), rendered in a sandbox.

Rendering follows Hugging Face's `apply_chat_template`: jinja2's
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the loop-controls
extension, `raise_exception`, `strftime_now`, HF's `tojson` filter, and the variables
`messages`, `tools`, `add_generation_prompt`, `bos_token`, `eos_token` plus any extra
keyword. `enable_thinking` is passed only when it is not None, so a template's
`enable_thinking is defined` check sees the template's own default otherwise.

The template is untrusted input: every failure (syntax error, `raise_exception`,
an operation on an undefined value, a sandbox violation, a Python error inside the
template) comes out as `engine.errors.TemplateError` with a one-line cause.
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import TemplateError

__all__ = ["ChatTemplate", "CHATML_TEMPLATE", "GEMMA_TEMPLATE", "fallback_for"]

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Gemma's turn format (the gemma-3 files' own template, for files that lack it): no system
# role, so a system prompt opens the first user turn; the assistant's role is "model". No BOS
# here: the tokenizer adds it (tokenizer.ggml.add_bos_token), as with ChatML.
GEMMA_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set prefix = messages[0]['content'] + '\n\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)

_FALLBACKS = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}
# architectures whose files may come without a template and do not speak ChatML
_ARCH_FALLBACKS = {"gemma3": "gemma"}


def fallback_for(arch: str | None) -> str:
    """The fallback template name for a GGUF `general.architecture` (ChatML unless known otherwise)."""
    return _ARCH_FALLBACKS.get(arch or "", "chatml")


class _RaisedByTemplate(Exception):
    pass


def _raise_exception(message="the chat template raised an error"):
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's override of jinja's tojson: no HTML escaping, non-ASCII kept, indent supported
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. `source=None` (or empty) uses the `fallback` (ChatML by default;
    `fallback_for(arch)` picks the one for an architecture)."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 fallback: str = "chatml"):
        if fallback not in _FALLBACKS:
            raise ValueError(f"unknown fallback template {fallback!r} (supported: {', '.join(_FALLBACKS)})")
        self.is_fallback = not source
        self.source: str = _FALLBACKS[fallback] if self.is_fallback else source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self._env = _make_env()
        self._template = None
        self._error: str | None = None
        self._variables: frozenset[str] = frozenset()
        try:
            ast = self._env.parse(self.source)
            self._variables = frozenset(jinja2.meta.find_undeclared_variables(ast))
            self._template = self._env.from_string(ast)
        except jinja2.TemplateSyntaxError as e:
            self._error = f"syntax error in the chat template (line {e.lineno}): {_one_line(e)}"
        except Exception as e:  # anything else the compiler rejects
            self._error = f"the chat template does not compile: {type(e).__name__}: {_one_line(e)}"

    @property
    def supports_thinking(self) -> bool:
        """True when the template reads `enable_thinking`."""
        if self._template is not None:
            return "enable_thinking" in self._variables
        return "enable_thinking" in self.source

    @property
    def error(self) -> str | None:
        """Why the template does not compile (None when it does)."""
        return self._error

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               enable_thinking: bool | None = None, tools=None, **extra) -> str:
        if self._template is None:
            raise TemplateError(self._error)
        ctx = dict(extra)
        ctx.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                   bos_token=self.bos_token, eos_token=self.eos_token)
        if enable_thinking is not None:
            ctx["enable_thinking"] = enable_thinking
        try:
            return self._template.render(**ctx)
        except _RaisedByTemplate as e:
            raise TemplateError(f"the chat template raised: {_one_line(e)}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"the chat template tried an unsafe operation: {_one_line(e)}") from None
        except jinja2.UndefinedError as e:
            raise TemplateError(f"the chat template used an undefined value: {_one_line(e)}") from None
        except RecursionError:
            raise TemplateError("the chat template recursed too deeply") from None
        except Exception as e:
            raise TemplateError(f"the chat template failed: {type(e).__name__}: {_one_line(e)}") from None
