"""Rendering untrusted templates: Jinja2's sandbox, the predecessor's helpers, size limits.

Templates come from requests and from the store, so they are untrusted. They are compiled only in
an `ImmutableSandboxedEnvironment` (no attribute escapes, and `data`, shared by every user of a
request, cannot be modified), and because the sandbox bounds neither memory nor time, every
operation that allocates in proportion to an argument is checked first (`template_limits`), the
rendered output is capped, and a template that could run for long (`Text.inline` false) is
rendered in a worker process under CPU and memory limits (`render_pool`).
"""

from __future__ import annotations

import functools
import logging
import types
from datetime import datetime, UTC
from typing import Any
from collections.abc import Callable

from babel import UnknownLocaleError
from babel.numbers import format_decimal
from jinja2 import ChainableUndefined, TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Markup  # markupsafe.Markup, re-exported by Jinja (not a direct dependency)
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter

from . import dateformat
from .errors import RenderError, RequestError
from .handlebars import RUNTIME, printed
from .template_limits import SizeGuard, TemplateLimitExceeded

logger = logging.getLogger(__name__)

# Raised by Python itself or by a helper when a template hands it a value it cannot take
# (`'a' + 1`, `dateFormat('soon')`, `data.list[99]`, a macro recursing forever): that delivery
# fails, nothing to log. Any other exception is a bug in our code and is logged.
_VALUE_ERRORS = (ValueError, TypeError, ArithmeticError, LookupError, RecursionError)


class _BoundedFormatterMixin(SandboxedFormatter):
    """`str.format` from templates: widths, precisions and the total output are bounded."""

    _guard: SizeGuard
    _produced: int

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._produced = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            self._guard.check_size(value, "a formatted value")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        self._guard.check_format_spec(format_spec)
        self._guard.check_size(value, "a formatted value")
        result = super().format_field(value, format_spec)
        self._produced += len(result)
        if self._produced > self._guard.max_chars:
            raise TemplateLimitExceeded(f"template error: str.format() exceeds {self._guard.max_chars} characters")
        return result


class _BoundedFormatter(_BoundedFormatterMixin, SandboxedFormatter):
    def __init__(self, env: Any, guard: SizeGuard) -> None:
        super().__init__(env)
        self._guard = guard


class _BoundedEscapeFormatter(_BoundedFormatterMixin, SandboxedEscapeFormatter):
    def __init__(self, env: Any, guard: SizeGuard, escape: Callable[[Any], Markup]) -> None:
        super().__init__(env, escape=escape)
        self._guard = guard


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with `SizeGuard` on its public hooks: operators, calls, filters, tests,
    globals, `str.format` and every printed expression. What grows by many small steps (a
    loop or a macro building a string with `~`, a block's output) is bounded by the worker
    process's memory limit and CPU budget instead (`render_pool`)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *, max_output: int, **options: Any) -> None:
        guard = SizeGuard(max_output)
        super().__init__(finalize=guard.finalize, **options)
        self.max_output = max_output
        self.guard = guard
        self.globals.update(guard.globals())
        self.filters = guard.filters(self.filters)
        self.tests.update(guard.tests(self.tests))

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The default returns an Undefined that ChainableUndefined renders as "": an attempt to
        # escape the sandbox (or to modify `data`) should fail that delivery visibly instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return self.guard.binop(operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # The sandbox's own wrapper, with a formatter that bounds widths and output.
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        receiver = value.__self__
        if not isinstance(receiver, str):
            return None
        str_type = type(receiver)
        is_format_map = value.__name__ == "format_map"
        formatter: SandboxedFormatter
        if isinstance(receiver, Markup):
            formatter = _BoundedEscapeFormatter(self, self.guard, escape=receiver.escape)
        else:
            formatter = _BoundedFormatter(self, self.guard)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            return str_type(formatter.vformat(receiver, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"{__obj!r} is not safely callable")
        # A bound str.format that did not come through getattr (wrap_str_format) still is bounded.
        wrapped = __self.wrap_str_format(__obj)
        if wrapped is not None:
            __obj = wrapped
        args, kwargs = __self.guard.before_call(__obj, args, kwargs)
        return __self.guard.after_call(__context.call(__obj, *args, **kwargs))


# The context key under which `ChannelPlan.message_for` passes what worker processes rendered
# for one user (a Text -> str or RenderError map). Not an identifier: no template can name it.
PRERENDERED = " prerendered"

# What a template that renders inline may contain: paths into `user`/`data`, literals, plain
# text, conditions, comparisons, the helpers, and filters and tests whose cost is linear in their
# input. No loops, macros, assignments, blocks, arithmetic, literals that build containers, `~`,
# method calls or filters that repeat, pad or iterate.
_INLINE_NODES = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.Const,
    nodes.Name,
    nodes.Getattr,
    nodes.Getitem,
    nodes.If,
    nodes.CondExpr,
    nodes.Not,
    nodes.And,
    nodes.Or,
    nodes.Compare,
    nodes.Operand,
    nodes.Keyword,
    nodes.Filter,
    nodes.Test,
    nodes.Call,
)
_INLINE_FILTERS = frozenset(
    "abs capitalize count d default e escape first float int last length lower safe string title trim upper".split()
)
_INLINE_TESTS = frozenset(
    "boolean callable defined eq equalto escaped false float ge greaterthan gt in integer iterable le lessthan lower "
    "lt mapping ne none number sameas sequence string true undefined upper".split()
)
_HELPERS = frozenset({"dateNow", "dateFormat", "toLocale"})


def runs_bounded(tree: nodes.Template) -> bool:
    """Whether a parsed Jinja template can be rendered on the event loop: its cost is bounded by
    its own length and the size of its context (see `_INLINE_NODES`). Decided once, at compile
    time, from the syntax tree; anything else renders in a worker process."""
    for node in tree.find_all(nodes.Node):
        if not isinstance(node, _INLINE_NODES):
            return False
        if isinstance(node, nodes.Name) and node.ctx != "load":
            return False
        if isinstance(node, (nodes.Filter, nodes.Test, nodes.Call)) and (node.dyn_args or node.dyn_kwargs):
            return False
        if isinstance(node, nodes.Filter) and node.name not in _INLINE_FILTERS:
            return False
        if isinstance(node, nodes.Test) and node.name not in _INLINE_TESTS:
            return False
        if isinstance(node, nodes.Call) and not (isinstance(node.node, nodes.Name) and node.node.name in _HELPERS):
            return False
    return True


# A part of a template that only prints text and paths: its text, or (escape, path).
_Part = str | tuple[bool, tuple[str, ...]]


def _substitution(tree: nodes.Template, html: bool) -> list[_Part] | None:
    """The parts of a template made of nothing but text and `{{path}}`s into `user` or `data`
    (what a Handlebars translation writes for them: `_hb_e(user["name"])`, `_hb_r(...)` for
    `{{{path}}}`), or None for any other template."""
    parts: list[_Part] = []
    for output in tree.body:
        if not isinstance(output, nodes.Output):
            return None
        for node in output.nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append(node.data)
                continue
            if not (
                isinstance(node, nodes.Call)
                and isinstance(node.node, nodes.Name)
                and node.node.name in ("_hb_e", "_hb_r")
                and len(node.args) == 1
                and not node.kwargs
                and node.dyn_args is None
                and node.dyn_kwargs is None
            ):
                return None
            keys: list[str] = []
            arg = node.args[0]
            while (
                isinstance(arg, nodes.Getitem) and isinstance(arg.arg, nodes.Const) and isinstance(arg.arg.value, str)
            ):
                keys.append(arg.arg.value)
                arg = arg.node
            if not (isinstance(arg, nodes.Name) and arg.name in ("user", "data") and arg.ctx == "load"):
                return None
            parts.append((html and node.node.name == "_hb_e", (arg.name, *reversed(keys))))
    return parts


def _substituting(
    parts: list[_Part], limit: int, render: Callable[[dict[str, Any]], str]
) -> Callable[[dict[str, Any]], str]:
    """Render `parts` without Jinja (a sixteenth of its cost: such templates are most of them,
    rendered once per delivery), where every step of every path is a key of a dict. Anything
    else (a missing key, a list, a value past the limit, a value `printed` cannot print) goes to
    `render`, the template compiled by Jinja, which then decides what it prints or raises."""

    def substitute(context: dict[str, Any]) -> str:
        pieces = []
        size = 0
        try:
            for part in parts:
                if isinstance(part, str):
                    piece = part
                else:
                    escape, path = part
                    value: Any = context
                    for key in path:
                        if type(value) is not dict or key not in value:
                            return render(context)
                        value = value[key]
                    piece = printed(value, escape)
                size += len(piece)
                if size > limit:
                    return render(context)
                pieces.append(piece)
        except Exception:
            return render(context)
        return "".join(pieces)

    return substitute


class Text:
    """One compiled template. Called with a context, it returns the text or raises `RenderError`.

    `inline`: it renders in time bounded by its length and its context, so it is rendered where
    it is called (on the event loop). Otherwise it is meant to be rendered in a worker process
    (`render_pool`) from `source` and `html`, and the results handed back in the context under
    `PRERENDERED`; called without them it raises RuntimeError (`render_here` renders it anyway)."""

    __slots__ = ("source", "html", "inline", "_render")

    def __init__(self, source: str, html: bool, inline: bool, render: Callable[[dict[str, Any]], str]) -> None:
        self.source = source
        self.html = html
        self.inline = inline
        self._render = render

    def __call__(self, context: dict[str, Any]) -> str:
        done = context.get(PRERENDERED)
        if done is not None:
            outcome = done.get(self)
            if isinstance(outcome, RenderError):
                raise outcome
            if outcome is not None:
                return outcome
        if not self.inline:
            # In the service process a loop could run for minutes or fill the memory: a bug of
            # the caller, who skipped `render_pool`, never the template's.
            raise RuntimeError("a template that can run away renders only in a worker process (render_pool)")
        return self._render(context)

    def render_here(self, context: dict[str, Any]) -> str:
        """Render in the calling thread whatever the template: bounded per operation and in
        output, not in time nor in total memory. For tests; the service uses `__call__`."""
        return self._render(context)


class Renderer:
    """Compiles templates once and renders them per user within the configured limits.

    Every operation's result and the output are bounded here; time and total memory are bounded
    by the worker process a template that is not `Text.inline` renders in (`render_pool`).
    """

    def __init__(self, *, default_locale: str, max_template_chars: int, max_rendered_chars: int) -> None:
        self.default_locale = default_locale
        self.max_template_chars = max_template_chars
        self.max_rendered_chars = max_rendered_chars
        self._default_locale = dateformat.parse_locale(default_locale)
        helpers = {"dateNow": date_now, "dateFormat": self._date_format, "toLocale": self._to_locale, **RUNTIME}
        self._plain = _LimitedSandbox(max_output=max_rendered_chars, undefined=ChainableUndefined, autoescape=False)
        self._html = _LimitedSandbox(max_output=max_rendered_chars, undefined=ChainableUndefined, autoescape=True)
        for env in (self._plain, self._html):
            env.globals.update(helpers)
        # Compilation is the expensive part; the same template text is reused across requests.
        self._compile_cached = functools.lru_cache(maxsize=512)(self._compile_uncached)

    @property
    def config(self) -> tuple[str, int, int]:
        """The arguments that recreate this renderer (in a worker process)."""
        return (self.default_locale, self.max_template_chars, self.max_rendered_chars)

    def compile(
        self,
        source: str,
        *,
        html: bool = False,
        field: str = "template",
        length_checked: bool = False,
        inline: bool | None = None,
    ) -> Text:
        """Return the compiled `source`; a template that is too long or does not compile is a
        `RequestError` naming `field`. `length_checked`: the caller checked the length of what
        the author wrote (a Handlebars translation is longer than its source). `inline`: the
        caller's verdict on whether it can render inline (a Handlebars translation without
        `#each`); None decides from the Jinja syntax tree (`runs_bounded`).

        The text raises `RenderError` (`template error: ...`) for anything that goes wrong while
        rendering; an unexpected exception in our own helpers is also logged."""
        if not length_checked:
            self.check_length(source, field)
        try:
            render, bounded = self._compile_cached(source, html)
        except TemplateError as exc:
            raise RequestError(f"{field}: template does not compile: {exc}") from None
        except (RecursionError, SyntaxError, MemoryError):
            # Python's own compiler gave up on the generated code: nesting beyond its limits.
            raise RequestError(f"{field}: template does not compile: nested too deeply") from None
        return Text(source, html, bounded if inline is None else inline, render)

    def render_function(self, source: str, html: bool) -> Callable[[dict[str, Any]], str]:
        """The render function of a template that compiled before (in the parent process)."""
        return self._compile_cached(source, html)[0]

    def check_length(self, source: str, field: str) -> None:
        if len(source) > self.max_template_chars:
            raise RequestError(f"{field}: template longer than {self.max_template_chars} characters")

    def _compile_uncached(self, source: str, html: bool) -> tuple[Callable[[dict[str, Any]], str], bool]:
        env = self._html if html else self._plain
        tree = env.parse(source)
        bounded = runs_bounded(tree)
        parts = _substitution(tree, html)
        template = env.from_string(tree)
        limit = self.max_rendered_chars

        def render(context: dict[str, Any]) -> str:
            size = 0
            parts = []
            try:
                for part in template.generate(context):
                    size += len(part)
                    if size > limit:
                        raise RenderError(f"rendered text exceeds {limit} characters")
                    parts.append(part)
            except RenderError:
                raise
            except TemplateError as exc:
                raise RenderError(f"template error: {exc}") from None
            except _VALUE_ERRORS as exc:  # a helper, filter or operator given a value it cannot take
                raise RenderError(f"template error: {exc}") from None
            except MemoryError:  # a worker process's memory limit
                raise RenderError("template error: rendering ran out of memory") from None
            except Exception as exc:
                logger.exception("unexpected error while rendering a template")
                raise RenderError(f"template error: {type(exc).__name__}: {exc}") from None
            return "".join(parts)

        if parts is not None:
            return _substituting(parts, limit, render), True
        return render, bounded

    def _date_format(self, value: Any, pattern: str = "YYYY-MM-DDTHH:mm:ssZ", tz: str | None = None) -> str:
        if value is None or isinstance(value, ChainableUndefined):
            return ""
        moment = dateformat.to_datetime(value).astimezone(dateformat.zone(tz))
        return dateformat.format_dayjs(moment, str(pattern), self._default_locale)

    def _to_locale(self, value: Any, locale: str | None = None) -> str:
        if value is None or isinstance(value, ChainableUndefined):
            return ""
        try:
            loc = dateformat.parse_locale(str(locale)) if locale else self._default_locale
        except UnknownLocaleError:
            raise ValueError(f"unknown locale {locale!r}") from None
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (int, float)):
            return format_decimal(value, locale=loc)
        from babel.dates import format_datetime

        return format_datetime(dateformat.to_datetime(value), "medium", locale=loc)


def date_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
