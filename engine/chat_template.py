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

The sandbox stops escapes, not work, so a render also runs under limits: a wall-clock budget,
a cap on the output and on any one string, list or integer the template builds (checked
before Python builds it: `*`, `+`, `**`, `%`, `~`, block sets, padding/format widths,
`to_bytes`, `replace`, `join`, `lipsum`, `tojson(indent)`, `batch`, `slice`), with the
deadline checked in those hooks and on every line of template code. Over a limit ->
`TemplateLimitError` naming it; `ChatTemplate.render` then switches to the built-in format
of the architecture (`fallback_for`) and says so.
"""

from __future__ import annotations

import json
import re
import string
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import TemplateError

__all__ = ["ChatTemplate", "CHATML_TEMPLATE", "GEMMA_TEMPLATE", "PHI3_TEMPLATE", "TemplateLimitError",
           "fallback_for"]

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

# Phi-3's turn format (the Phi-3 files' own template, for one that fails): system, user and
# assistant turns each closed by <|end|>.
PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] in ('system', 'user', 'assistant') %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

_FALLBACKS = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE, "phi3": PHI3_TEMPLATE}
# architectures that do not speak ChatML (qwen2/qwen3/qwen35 and llama-arch SmolLM2 do)
_ARCH_FALLBACKS = {"gemma3": "gemma", "phi3": "phi3"}
_FALLBACK_LABELS = {"chatml": "ChatML", "gemma": "Gemma turn", "phi3": "Phi-3"}

# Limits of one render. The sandbox stops escapes, not work: without these a template can loop
# for hours or build gigabyte strings. Real templates render in milliseconds and a whole chat
# history fits many times over in the output cap (a 262K-token context is ~1M characters).
MAX_RENDER_SECONDS = 2.0
MAX_OUTPUT_CHARS = 8 << 20       # the rendered prompt, and any one string built on the way
MAX_ITEMS = 1 << 20              # any one list/tuple built on the way (repetition, batch, slice)
MAX_INT_BITS = 1 << 16           # integers built by *, ** and <<
MAX_LIPSUM_PARAGRAPHS = 20


def fallback_for(arch: str | None) -> str:
    """The fallback template name for a GGUF `general.architecture` (ChatML unless known otherwise)."""
    return _ARCH_FALLBACKS.get(arch or "", "chatml")


class TemplateLimitError(TemplateError):
    """A render went over one of the limits above (time, output size, a value's size)."""


class _RaisedByTemplate(Exception):
    pass


class _OverLimit(Exception):
    """Raised inside a render (hooks, tracer); turned into TemplateLimitError at the edge."""


def _raise_exception(message="the chat template raised an error"):
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# -- size checks used by the hooks and the bounded filters -----------------------------------
def _check_chars(n: int, what: str):
    if n > MAX_OUTPUT_CHARS:
        raise _OverLimit(f"{what} would build {n:,} characters (limit {MAX_OUTPUT_CHARS:,})")


def _check_items(n: int, what: str):
    if n > MAX_ITEMS:
        raise _OverLimit(f"{what} would build {n:,} items (limit {MAX_ITEMS:,})")


def _check_width(n, what: str):
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_OUTPUT_CHARS:
        raise _OverLimit(f"{what} width {n:,} is over the limit ({MAX_OUTPUT_CHARS:,} characters)")


def _size(x) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


def _check_product(left, right, what: str):
    """`seq * n`, `n * seq`, `int * int`: check the result's size before Python builds it."""
    for seq, n in ((left, right), (right, left)):
        size = _size(seq)
        if size is not None and isinstance(n, int):
            total = size * max(n, 0)
            (_check_chars if isinstance(seq, (str, bytes)) else _check_items)(total, what)
            return
    if isinstance(left, int) and isinstance(right, int) \
            and abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
        raise _OverLimit(f"{what} would build an integer over {MAX_INT_BITS:,} bits")


def _check_sum(left, right, what: str):
    a, b = _size(left), _size(right)
    if a is not None and b is not None:
        (_check_chars if isinstance(left, (str, bytes)) else _check_items)(a + b, what)


def _check_power(base, exp):
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1 \
            and abs(base).bit_length() * exp > MAX_INT_BITS:
        raise _OverLimit(f"'**' would build an integer over {MAX_INT_BITS:,} bits")


_PRINTF_WIDTH = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(fmt: str, args):
    """'%10000000000s' % x and friends: widths and precisions are sizes."""
    star = False
    for m in _PRINTF_WIDTH.finditer(fmt):
        for g in m.groups():
            if g == "*":
                star = True
            elif g:
                _check_width(int(g), "a % format")
    if star:
        for a in args if isinstance(args, tuple) else (args,):
            _check_width(a, "a % format")


def _check_format_spec(fmt: str, args, kwargs):
    """'{:>10000000000}'.format(x): widths in the replacement fields are sizes."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format will raise its own error
    for _, _, spec, _ in fields:
        for digits in re.findall(r"\d+", spec or ""):
            _check_width(int(digits), "a format")
        if spec and "{" in spec:  # nested width taken from the arguments
            for a in (*args, *kwargs.values()):
                _check_width(a, "a format")


def _check_method_call(obj, args, kwargs):
    """Methods of str/bytes/int whose arguments say how big the result is."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    name = getattr(target, "__name__", "")
    if isinstance(owner, (str, bytes)):
        if name in ("center", "ljust", "rjust", "zfill") and args:
            _check_width(args[0], f"{name}()")
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(tab, int):
                _check_chars(len(owner) * max(tab, 1), "expandtabs()")
        elif name == "replace" and len(args) >= 2 and _size(args[1]) is not None:
            _check_chars(len(owner) + (len(owner) + 1) * len(args[1]), "replace()")
        elif name == "join" and args:
            _check_join(owner, args[0])
        elif name in ("format", "format_map") and isinstance(owner, str):
            _check_format_spec(owner, args, kwargs)
    elif isinstance(owner, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        _check_width(length, "to_bytes()")


def _check_join(sep, items):
    if isinstance(items, (list, tuple)):
        total = sum(len(x) for x in items if isinstance(x, (str, bytes))) + len(sep) * max(len(items) - 1, 0)
        _check_chars(total, "join")


# -- the render's clock ----------------------------------------------------------------------
class _Budget:
    """The deadline and the output count of the render running on this thread.

    Time is checked cooperatively: in the sandbox's call and operator hooks, and by a trace
    function (this thread only, removed after the render) at every Python call and at every
    line of compiled template code, so a loop with no calls in it (`{% for i in range(100000) %}`
    nested) still reaches a check on each iteration. Work that is a single C call (a big
    repetition or padding) is refused before it starts by the size checks instead.
    """

    def __init__(self):
        self.local = threading.local()

    def start(self, seconds: float):
        self.local.deadline = time.monotonic() + seconds

    def stop(self):
        self.local.deadline = None

    def check(self):
        deadline = getattr(self.local, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            self.local.deadline = None  # raise once; the unwinding code must not trip again
            raise _OverLimit(f"rendering took longer than {MAX_RENDER_SECONDS:g} s")

    def trace(self, frame, event, arg):
        self.check()
        if frame.f_code.co_filename == "<template>":
            return self._trace_lines
        return None

    def _trace_lines(self, frame, event, arg):
        self.check()
        return self._trace_lines


_BUDGET = _Budget()


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The HF environment with every size-making operation checked (see the module docstring)."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context, operator, left, right):
        _BUDGET.check()
        if operator == "*":
            _check_product(left, right, "'*'")
        elif operator == "+":
            _check_sum(left, right, "'+'")
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _BUDGET.check()
        _check_method_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _capped_concat(parts) -> str:
    """jinja's `concat` (block sets, macros, caller) with the size cap."""
    out = []
    total = 0
    for p in parts:
        total += len(p)
        _check_chars(total, "a block")
        out.append(p)
    return "".join(out)


def _capped_str_join(seq) -> str:
    """The `~` operator's join, capped."""
    parts = [str(x) for x in seq]
    _check_chars(sum(map(len, parts)), "'~'")
    return "".join(parts)


def _capped_markup_join(seq):
    parts = list(seq)
    _check_chars(sum(len(x) for x in parts if isinstance(x, str)), "'~'")
    return jinja2.runtime.markup_join(parts)


# bounded versions of the built-in filters and globals whose arguments are sizes
def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's override of jinja's tojson: no HTML escaping, non-ASCII kept, indent supported
    if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
        raise _OverLimit("tojson indent over 64")
    out = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    _check_chars(len(out), "tojson")
    return out


def _center(value, width=80):
    _check_width(width, "center")
    return jinja2.filters.do_center(value, width)


def _indent(s, width=4, first=False, blank=False):
    text = str(s)
    pad = width if isinstance(width, int) else len(str(width))
    _check_chars(len(text) + (text.count("\n") + 1) * max(pad, 0), "indent")
    return jinja2.filters.do_indent(s, width, first, blank)


def _format(value, *args, **kwargs):
    _check_printf(str(value), args if args else tuple(kwargs.values()))
    return jinja2.filters.do_format(value, *args, **kwargs)


@jinja2.pass_eval_context
def _replace(eval_ctx, s, old, new, count=None):
    n = len(str(s))
    _check_chars(n + (n + 1) * len(str(new)), "replace")
    return jinja2.filters.do_replace(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _join(eval_ctx, value, d="", attribute=None):
    items = list(value) if not isinstance(value, (str, bytes)) else value
    if isinstance(items, list):
        _check_items(len(items), "join")
        _check_chars(sum(len(str(x)) for x in items) + len(str(d)) * max(len(items) - 1, 0), "join")
    return jinja2.filters.sync_do_join(eval_ctx, items, d, attribute)


def _batch(value, linecount, fill_with=None):
    _check_items(linecount if isinstance(linecount, int) else 0, "batch")
    return jinja2.filters.do_batch(value, linecount, fill_with)


def _slice(value, slices, fill_with=None):
    _check_items(slices if isinstance(slices, int) else 0, "slice")
    return jinja2.filters.sync_do_slice(value, slices, fill_with)


def _wordwrap(environment, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    # every character may start a line: the wrap string can repeat once per character
    _check_chars(len(str(s)) * (1 + len(str(wrapstring or "\n"))), "wordwrap")
    return jinja2.filters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (jinja's argument names)
    if not all(isinstance(v, int) for v in (n, min, max)) or n > MAX_LIPSUM_PARAGRAPHS or max > 1000:
        raise _OverLimit(f"lipsum over {MAX_LIPSUM_PARAGRAPHS} paragraphs of 1000 words")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.concat = _capped_concat  # type: ignore[method-assign]  # jinja calls env.concat for block output
    env.filters.update(tojson=_tojson, center=_center, indent=_indent, format=_format, replace=_replace,
                       join=_join, batch=_batch, slice=_slice)
    env.filters["wordwrap"] = jinja2.pass_environment(_wordwrap)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["lipsum"] = _lipsum
    return env


def _compile(env, ast):
    template = env.from_string(ast)
    # the `~` operator is compiled to calls of these module-level names
    namespace = template.root_render_func.__globals__
    namespace["str_join"] = _capped_str_join
    namespace["markup_join"] = _capped_markup_join
    return template


class ChatTemplate:
    """A compiled chat template. `source=None` (or empty) uses the `fallback` (ChatML by default;
    `fallback_for(arch)` picks the one for an architecture).

    `render` runs under the limits above. When the model's own template goes over one, it is
    replaced by the fallback for the rest of the session: `fallback_reason` says why and
    `on_fallback` (if set) is called once with a one-line notice for the user. Other template
    errors (its own `raise_exception`, a syntax error) stay errors: they are the template's word.
    """

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 fallback: str = "chatml"):
        if fallback not in _FALLBACKS:
            raise ValueError(f"unknown fallback template {fallback!r} (supported: {', '.join(_FALLBACKS)})")
        self.fallback = fallback
        self.is_fallback = not source
        self.source: str = source if source else _FALLBACKS[fallback]
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.fallback_reason: str | None = None
        self.on_fallback: Callable[[str], None] | None = None
        self._env = _make_env()
        self._compile_source()

    def _compile_source(self):
        self._template = None
        self._error: str | None = None
        self._variables: frozenset[str] = frozenset()
        try:
            ast = self._env.parse(self.source)
            self._variables = frozenset(jinja2.meta.find_undeclared_variables(ast))
            self._template = _compile(self._env, ast)
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
        try:
            return self.render_strict(messages, add_generation_prompt, enable_thinking, tools, **extra)
        except TemplateLimitError as e:
            if self.is_fallback:
                raise
            self.use_fallback(str(e))
        return self.render_strict(messages, add_generation_prompt, enable_thinking, tools, **extra)

    def use_fallback(self, reason: str):
        """Render with the built-in format of this architecture from now on."""
        label = _FALLBACK_LABELS[self.fallback]
        self.fallback_reason = reason
        self.is_fallback = True
        self.source = _FALLBACKS[self.fallback]
        self._compile_source()
        if self.on_fallback is not None:
            self.on_fallback(f"{reason}; using the built-in {label} format instead")

    def render_strict(self, messages: list[dict], add_generation_prompt: bool = True,
                      enable_thinking: bool | None = None, tools=None, **extra) -> str:
        """Render with this template only; over a limit -> TemplateLimitError naming it."""
        if self._template is None:
            raise TemplateError(self._error)
        ctx = dict(extra)
        ctx.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                   bos_token=self.bos_token, eos_token=self.eos_token)
        if enable_thinking is not None:
            ctx["enable_thinking"] = enable_thinking
        previous_trace = sys.gettrace()
        _BUDGET.start(MAX_RENDER_SECONDS)
        sys.settrace(_BUDGET.trace)
        try:
            parts = []
            total = 0
            for chunk in self._template.generate(**ctx):
                total += len(chunk)
                _check_chars(total, "the rendered prompt")
                parts.append(chunk)
            return "".join(parts)
        except _OverLimit as e:
            raise TemplateLimitError(f"the chat template went over a limit: {_one_line(e)}") from None
        except _RaisedByTemplate as e:
            raise TemplateError(f"the chat template raised: {_one_line(e)}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"the chat template tried an unsafe operation: {_one_line(e)}") from None
        except jinja2.UndefinedError as e:
            raise TemplateError(f"the chat template used an undefined value: {_one_line(e)}") from None
        except RecursionError:
            raise TemplateError("the chat template recursed too deeply") from None
        except MemoryError:
            raise TemplateLimitError("the chat template went over a limit: out of memory") from None
        except Exception as e:
            raise TemplateError(f"the chat template failed: {type(e).__name__}: {_one_line(e)}") from None
        finally:
            sys.settrace(previous_trace)
            _BUDGET.stop()
