"""Rendering untrusted templates: Jinja2's sandbox, the predecessor's helpers, size limits.

Templates come from requests and from the store, so they are untrusted: they are compiled only in
a `SandboxedEnvironment`, and because the sandbox bounds neither memory nor output, this module
caps template size, the size of `*`/`**` results and the rendered output.
"""

from __future__ import annotations

import functools
import operator
from datetime import datetime, timezone
from typing import Any, Callable

from babel.numbers import format_decimal
from jinja2 import ChainableUndefined, TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from . import dateformat
from .errors import RenderError, RequestError

class _LimitedSandbox(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *, max_output: int, **options: Any) -> None:
        super().__init__(**options)
        self.max_output = max_output

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The default returns an Undefined that ChainableUndefined renders as "": an attempt to
        # escape the sandbox should fail that delivery visibly instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        # The sandbox blocks attribute escapes, not `'a' * 10**9`: bound the size of the result
        # before computing it.
        if op == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise RenderError("exponent too large")
            return operator.pow(left, right)
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                if len(seq) * count > self.max_output:
                    raise RenderError("repetition exceeds the rendered size limit")
        return operator.mul(left, right)


class Renderer:
    """Compiles templates once and renders them per user within the configured limits."""

    def __init__(self, *, default_locale: str, max_template_chars: int, max_rendered_chars: int) -> None:
        self.max_template_chars = max_template_chars
        self.max_rendered_chars = max_rendered_chars
        self._default_locale = dateformat.parse_locale(default_locale)
        helpers = {"dateNow": date_now, "dateFormat": self._date_format, "toLocale": self._to_locale}
        self._plain = _LimitedSandbox(max_output=max_rendered_chars, undefined=ChainableUndefined, autoescape=False)
        self._html = _LimitedSandbox(max_output=max_rendered_chars, undefined=ChainableUndefined, autoescape=True)
        for env in (self._plain, self._html):
            env.globals.update(helpers)
        # Compilation is the expensive part; the same template text is reused across requests.
        self._compile_cached = functools.lru_cache(maxsize=512)(self._compile_uncached)

    def compile(self, source: str, *, html: bool = False, field: str = "template") -> Callable[[dict[str, Any]], str]:
        """Return a render function for `source`; a template that is too long or does not
        compile is a `RequestError` naming `field`."""
        if len(source) > self.max_template_chars:
            raise RequestError(f"{field}: template longer than {self.max_template_chars} characters")
        try:
            return self._compile_cached(source, html)
        except TemplateError as exc:
            raise RequestError(f"{field}: template does not compile: {exc}") from None

    def _compile_uncached(self, source: str, html: bool) -> Callable[[dict[str, Any]], str]:
        template = (self._html if html else self._plain).from_string(source)
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
            except TemplateError as exc:
                raise RenderError(f"template error: {exc}") from None
            except RenderError:
                raise
            except Exception as exc:  # a helper or filter given a value it cannot handle
                raise RenderError(f"template error: {exc}") from None
            return "".join(parts)

        return render

    def _date_format(self, value: Any, pattern: str = "YYYY-MM-DDTHH:mm:ssZ", tz: str | None = None) -> str:
        if value is None or isinstance(value, ChainableUndefined):
            return ""
        moment = dateformat.to_datetime(value).astimezone(dateformat.zone(tz))
        return dateformat.format_dayjs(moment, str(pattern), self._default_locale)

    def _to_locale(self, value: Any, locale: str | None = None) -> str:
        if value is None or isinstance(value, ChainableUndefined):
            return ""
        loc = dateformat.parse_locale(locale) if locale else self._default_locale
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (int, float)):
            return format_decimal(value, locale=loc)
        from babel.dates import format_datetime

        return format_datetime(dateformat.to_datetime(value), "medium", locale=loc)


def date_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
