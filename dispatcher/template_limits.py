"""Size limits for untrusted templates: what one operation of a template builds stays near
`max_chars`, checked BEFORE it is computed.

Jinja's sandbox stops attribute escapes, not allocation: one C-level call such as
`'x'.center(10**9)`, `'%*s' % (10**9, 'x')` or `10 ** 10**9` allocates gigabytes or runs for
minutes without ever returning to Python code. Templates that can do this render in a worker
process whose memory limit and CPU kill would stop it too (`render_pool`), but only after it has
cost a worker up to ~0.5 s of CPU and a restart; these checks refuse it in microseconds, through
the sandbox's public hooks (operators, calls, filters, tests, globals, `str.format`, printed
values): repetition, powers and products of integers, concatenation with `+`, `%`/`str.format`
widths and precisions, the str methods and filters that pad, join, replace or repeat, `range`,
`lipsum`, and the filters and calls that materialize an iterator.

What grows by many cheap steps (`~` in a loop, a macro's or block's output, `loop.length` of an
iterator, `*args`) is left to the worker's limits: bounding it took a subclass of Jinja's private
code generator, and the process limits bound it as well.

Strings are measured by `len`; containers by `size_of`, the length of their text form, which
counts a shared element every time it appears.
"""

from __future__ import annotations

import builtins
import functools
import re
import types
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any
from collections.abc import Callable

from jinja2.filters import make_attrgetter, sync_do_join
from jinja2.runtime import Macro, Undefined
from jinja2.utils import Cycler, Namespace, _PassArg, generate_lorem_ipsum, pass_environment, pass_eval_context
from jinja2.runtime import Markup  # markupsafe.Markup, re-exported by Jinja (not a direct dependency)

from .errors import RenderError

# ints far beyond anything a message needs, still cheap to multiply (Python refuses to print more
# than 4300 digits, about 14,300 bits, anyway).
DEFAULT_MAX_INT_BITS = 16_384
# The sandbox's own cap on `range` (jinja2.sandbox.MAX_RANGE).
DEFAULT_MAX_RANGE = 100_000
# Generous bound on characters per lipsum word, punctuation and separator included.
_LIPSUM_CHARS_PER_WORD = 16
# Escaping for HTML turns one character into at most six (`&#34;`).
_ESCAPE_FACTOR = 6

_VIEWS: tuple[type[Collection[Any]], ...] = (type({}.keys()), type({}.values()), type({}.items()))
_FLAT_SEQUENCES: tuple[type[Collection[Any]], ...] = (list, tuple, set, frozenset, deque) + _VIEWS


class TemplateLimitExceeded(RenderError):
    """A template operation would build a value past a size limit; raised before building it."""


def _too_big(what: str, limit: int, unit: str = "characters") -> TemplateLimitExceeded:
    return TemplateLimitExceeded(f"template error: {what} exceeds {limit} {unit}")


def _namespace_attrs(ns: Namespace) -> dict[str, Any]:
    return object.__getattribute__(ns, "_Namespace__attrs")


def shape_of(obj: Any, budget: int) -> tuple[int, int, int]:
    """(size, nodes, depth) of `obj`'s text form, stopping early once size exceeds `budget`
    (the size returned is then `budget + 1`).

    Size is an upper estimate of `len(str(obj))` for a string and of `len(repr(obj))` for a
    container (the escapes of unprintable characters aside); a shared element is counted every
    time it appears, as in its text form. Iterators are never advanced. The walk is iterative, so
    deep nesting costs no recursion, and stops after at most `budget` steps.
    """
    total = nodes = depth = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, level = stack.pop()
        nodes += 1
        if level > depth:
            depth = level
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, int):
            # bool included; decimal digits of n bits are at most n * 0.3011 + 1.
            total += (item.bit_length() * 78 >> 8) + 2
        elif isinstance(item, float) or item is None:
            total += 24
        elif isinstance(item, (bytes, bytearray)):
            total += 4 * len(item) + 3
        elif isinstance(item, Undefined):
            total += 10
        elif isinstance(item, _FLAT_SEQUENCES):
            total += 2
            for element in item:
                total += 2
                stack.append((element, level + 1))
                if total > budget:
                    return budget + 1, nodes, depth
        elif isinstance(item, (Mapping, Namespace)):
            mapping = _namespace_attrs(item) if isinstance(item, Namespace) else item
            total += 16
            for key, value in mapping.items():
                total += 4
                stack.append((key, level + 1))
                stack.append((value, level + 1))
                if total > budget:
                    return budget + 1, nodes, depth
        elif isinstance(item, types.MethodType):
            # The repr of a bound Python method includes the repr of its object.
            total += 64
            stack.append((item.__self__, level + 1))
        else:
            total += 64
        if total > budget:
            return budget + 1, nodes, depth
    return total, nodes, depth


def size_of(obj: Any, budget: int) -> int:
    """Upper estimate of the length of `obj`'s text form, or `budget + 1` once past `budget`
    (`shape_of` without the shape, and faster: scalars inside containers are not stacked)."""
    kind = type(obj)
    if kind is str:
        return len(obj)
    if kind is int or kind is bool:
        return (obj.bit_length() * 78 >> 8) + 2
    if kind is float or obj is None:
        return 24
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, _FLAT_SEQUENCES):
            # Two characters per element at least: refuse a huge container without walking it.
            total += 2 + 2 * len(item)
            if total > budget:
                return budget + 1
            for element in item:
                kind = type(element)
                if kind is str:
                    total += len(element) + 2
                elif kind is int:
                    total += (element.bit_length() * 78 >> 8) + 2
                elif kind is float or element is None or kind is bool:
                    total += 24
                else:
                    stack.append(element)
                if total > budget:
                    return budget + 1
        elif isinstance(item, (Mapping, Namespace)):
            mapping = _namespace_attrs(item) if isinstance(item, Namespace) else item
            total += 16 + 4 * len(mapping)
            if total > budget:
                return budget + 1
            for key, value in mapping.items():
                if type(key) is str:
                    total += len(key) + 2
                else:
                    stack.append(key)
                kind = type(value)
                if kind is str:
                    total += len(value) + 2
                elif kind is int:
                    total += (value.bit_length() * 78 >> 8) + 2
                else:
                    stack.append(value)
                if total > budget:
                    return budget + 1
        else:
            total += shape_of(item, budget - total)[0]
        if total > budget:
            return budget + 1
    return total


def _text_len(obj: Any, budget: int) -> int:
    return len(obj) if isinstance(obj, (str, bytes)) else size_of(obj, budget)


def _is_iterator(value: Any) -> bool:
    return isinstance(value, Iterator)


class SizeGuard:
    """The checks of one environment. `max_chars` is the configured `max_rendered_chars`."""

    def __init__(
        self, max_chars: int, *, max_int_bits: int = DEFAULT_MAX_INT_BITS, max_range: int = DEFAULT_MAX_RANGE
    ) -> None:
        self.max_chars = max_chars
        self.max_int_bits = max_int_bits
        self.max_range = min(max_range, max_chars)

    # -- generic checks -------------------------------------------------------------------------

    def check_size(self, value: Any, what: str) -> None:
        """Refuse `value` when its text form would exceed the limit (checked before stringifying)."""
        if size_of(value, self.max_chars) > self.max_chars:
            raise _too_big(what, self.max_chars)

    def text(self, value: Any, what: str) -> str:
        """`str(value)`, refused first when it would exceed the limit."""
        self.check_size(value, what)
        return str(value)

    def check_result(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, bytes)) and len(value) > self.max_chars:
            raise _too_big(what, self.max_chars)
        return value

    def bounded_iter(self, iterable: Any) -> Any:
        """`iterable` itself when it already exists in memory (it has a length); an iterator
        wrapped so that whoever materializes it (list, sort, join, `*args`, `loop.length`...)
        fails once the items taken add up past the limit."""
        if not _is_iterator(iterable):
            return iterable
        return self._bounded_items(iterable)

    def _bounded_items(self, iterator: Iterator[Any]) -> Iterator[Any]:
        budget = self.max_chars
        used = 0
        for item in iterator:
            used += size_of(item, budget - used) + 2
            if used > budget:
                raise _too_big("a sequence built by the template", budget)
            yield item

    def bounded_list(self, iterable: Iterable[Any]) -> list[Any]:
        return list(self.bounded_iter(iterable))

    def finalize(self, value: Any) -> Any:
        """Environment `finalize`: every `{{ expression }}` is measured before it is stringified."""
        if (len(value) if type(value) is str else size_of(value, self.max_chars)) > self.max_chars:
            # Worded as the output limit it anticipates.
            raise TemplateLimitExceeded(f"rendered text exceeds {self.max_chars} characters")
        return value

    def binop(self, op: str, left: Any, right: Any) -> Any:
        limit = self.max_chars
        if op == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > self.max_int_bits:
                    raise _too_big("a product", self.max_int_bits, "bits")
                return left * right
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int) and count > 0:
                    if _text_len(seq, limit) * count > limit:
                        raise _too_big("repetition", limit)
            return self.check_result(left * right, "repetition")
        if op == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                # Jinja's `**` is left-associative: 10**64**64 is (10**64)**64. Bound the result,
                # not the exponent.
                if left.bit_length() * right > self.max_int_bits:
                    raise TemplateLimitExceeded(
                        f"template error: exponent too large: the result would exceed {self.max_int_bits} bits"
                    )
            return left**right
        if op == "+":
            if (isinstance(left, (str, bytes)) and isinstance(right, (str, bytes))) or (
                isinstance(left, (list, tuple)) and isinstance(right, (list, tuple))
            ):
                if _text_len(left, limit) + _text_len(right, limit) > limit:
                    raise _too_big("a concatenation", limit)
            return self.check_result(left + right, "a concatenation")
        if op == "%":
            if isinstance(left, (str, bytes)):
                if percent_format_size(left, right, limit) > limit:
                    raise _too_big("a `%` formatting", limit)
                return self.check_result(left % right, "a `%` formatting")
            return left % right
        raise AssertionError(f"operator {op!r} is not intercepted")

    # -- calls ----------------------------------------------------------------------------------

    def before_call(
        self, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Check a call made by a template; returns the arguments to call with (iterators are
        wrapped by `bounded_iter`, a joined iterable is materialized)."""
        for a in args:
            if _is_iterator(a):
                args = tuple(self.bounded_iter(a) for a in args)
                break
        for v in kwargs.values():
            if _is_iterator(v):
                kwargs = {k: self.bounded_iter(v) for k, v in kwargs.items()}
                break
        if isinstance(obj, Macro):
            # A macro packs extra arguments into `varargs`/`kwargs`: a new container.
            if obj.catch_varargs or obj.catch_kwargs:
                self.check_size((args, kwargs), "the arguments of a macro call")
            return args, kwargs
        receiver = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", "")
        if isinstance(receiver, (str, bytes)):
            return self._check_str_method(receiver, name, args, kwargs)
        if isinstance(receiver, int) and name == "to_bytes":
            length = args[0] if args else kwargs.get("length", 1)
            if isinstance(length, int) and length > self.max_chars:
                raise _too_big("int.to_bytes()", self.max_chars, "bytes")
        elif isinstance(receiver, type) and issubclass(receiver, dict) and name == "fromkeys" and args:
            value = args[1] if len(args) > 1 else kwargs.get("value")
            per_key = size_of(value, self.max_chars) + 4
            if hasattr(args[0], "__len__") and len(args[0]) * per_key > self.max_chars:
                raise _too_big("dict.fromkeys()", self.max_chars)
            keys = self.bounded_list(args[0])
            if len(keys) * per_key + size_of(keys, self.max_chars) > self.max_chars:
                raise _too_big("dict.fromkeys()", self.max_chars)
            args = (keys, *args[1:])
        return args, kwargs

    def after_call(self, result: Any) -> Any:
        return self.check_result(result, "the result of a call")

    def _check_str_method(
        self, s: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        limit = self.max_chars
        # Markup's methods escape their arguments first.
        factor = _ESCAPE_FACTOR if isinstance(s, Markup) else 1
        what = f"{type(s).__name__}.{name}()"
        if name in ("center", "ljust", "rjust", "zfill"):
            width = args[0] if args else kwargs.get("width", 0)
            if isinstance(width, int) and width > limit:
                raise _too_big(what, limit)
        elif name == "expandtabs":
            tabsize = args[0] if args else kwargs.get("tabsize", 8)
            tabs = s.count("\t") if isinstance(s, str) else s.count(b"\t")
            if isinstance(tabsize, int) and len(s) + tabs * max(tabsize, 0) > limit:
                raise _too_big(what, limit)
        elif name == "replace" and len(args) >= 2:
            old, new = args[0], args[1]
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            if isinstance(old, (str, bytes)) and isinstance(new, (str, bytes)) and isinstance(count, int):
                n = len(s) + 1 if not old else s.count(old)  # type: ignore[arg-type]
                if count >= 0:
                    n = min(n, count)
                if len(s) * factor + n * (len(new) * factor - len(old)) > limit:
                    raise _too_big(what, limit)
        elif name == "join" and args:
            items = self.bounded_list(args[0])
            total = len(s) * max(len(items) - 1, 0)
            for item in items:
                if total > limit:
                    break
                total += _text_len(item, limit) * factor
            if total > limit:
                raise _too_big(what, limit)
            args = (items, *args[1:])
        elif name == "translate" and args:
            table = args[0]
            if isinstance(table, Mapping):
                values: Iterable[Any] = table.values()
            elif isinstance(table, (str, bytes)):
                values = ()
            elif isinstance(table, Sequence):
                values = table
            else:
                raise TypeError(f"{what} needs a dict, list or str table")
            longest = max((len(v) for v in values if isinstance(v, (str, bytes))), default=1)
            if len(s) * max(longest, 1) > limit:
                raise _too_big(what, limit)
        return args, kwargs

    # -- str.format -----------------------------------------------------------------------------

    def check_format_spec(self, spec: str) -> None:
        # Any number in a format spec is a width or a precision (or a fill digit): a number past
        # the limit is refused without parsing each type's mini-language.
        for digits in re.findall(r"\d+", spec):
            digits = digits.lstrip("0")
            if len(digits) > len(str(self.max_chars)) or (digits and int(digits) > self.max_chars):
                raise _too_big(f"the format spec {spec[:40]!r}", self.max_chars)

    # -- globals --------------------------------------------------------------------------------

    def globals(self) -> dict[str, Any]:
        """Checked replacements of the sandbox's `range`, `lipsum`, `dict`, `namespace`, `cycler`."""
        guard = self

        def range_(*args: int) -> range:
            rng = range(*args)
            if len(rng) > guard.max_range:
                raise _too_big(f"range of {len(rng)} items", guard.max_range, "items")
            return rng

        def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
            if isinstance(n, int) and isinstance(min, int) and isinstance(max, int):
                words = builtins.max(min, max, 0)
                if n * (words + 1) * _LIPSUM_CHARS_PER_WORD > guard.max_chars:
                    raise _too_big(f"lipsum({n}, max={max})", guard.max_chars)
            return generate_lorem_ipsum(n, html, min, max)

        def dict_(*args: Any, **kwargs: Any) -> dict[Any, Any]:
            guard.check_size((args, kwargs), "dict()")
            return dict(*args, **kwargs)

        def namespace(*args: Any, **kwargs: Any) -> Namespace:
            guard.check_size((args, kwargs), "namespace()")
            return Namespace(*args, **kwargs)

        def cycler(*items: Any) -> Cycler:
            guard.check_size(items, "cycler()")
            return Cycler(*items)

        return {"range": range_, "lipsum": lipsum, "dict": dict_, "namespace": namespace, "cycler": cycler}

    # -- filters and tests ----------------------------------------------------------------------

    def filters(self, originals: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
        """Checked versions of Jinja's builtin filters (every name in `originals`)."""
        custom = {"join": self._join, "sum": self._sum}
        checked = {}
        for name, func in originals.items():
            checked[name] = custom.get(name) or self._wrap_filter(name, func)
        return checked

    def tests(self, originals: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
        """Checked versions of Jinja's builtin tests (every name in `originals`; Jinja's table is
        typed loosely, as plain functions)."""
        checked = dict(originals)

        def numeric(test: Callable[..., bool]) -> Callable[..., bool]:
            # `value % 2` on a string is `%` formatting: `'%999999999s' is odd` would allocate.
            @functools.wraps(test)
            def check(value: Any, *args: Any) -> bool:
                if isinstance(value, (str, bytes)):
                    raise TypeError(f"the {test.__name__[5:]} test needs a number")
                return test(value, *args)

            return check

        def stringifying(test: Callable[..., bool]) -> Callable[..., bool]:
            @functools.wraps(test)
            def check(value: Any) -> bool:
                self.check_size(value, f"the value of the {test.__name__[5:]} test")
                return test(value)

            return check

        for name in ("odd", "even", "divisibleby"):
            checked[name] = numeric(originals[name])
        for name in ("lower", "upper"):
            checked[name] = stringifying(originals[name])
        return checked

    def _wrap_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        skip = 0 if _PassArg.from_obj(func) is None else 1
        materializes = name in _MATERIALIZING_FILTERS
        stringifies = name in _STRINGIFYING_FILTERS
        pre = getattr(self, f"_pre_{name}", None)
        what = f"the |{name} filter"

        @functools.wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if len(args) > skip:
                value = args[skip]
                if materializes and _is_iterator(value):
                    args = (*args[:skip], self.bounded_iter(value), *args[skip + 1 :])
                elif stringifies:
                    self.check_size(value, f"the value given to {what}")
                if pre is not None:
                    pre(args[0] if skip else None, *args[skip:], **kwargs)
            return self.check_result(func(*args, **kwargs), what)

        return checked

    # Argument checks, one per filter, with the filter's own parameters (after its pass_* arg).

    def _pre_center(self, _: Any, value: Any, width: int = 80) -> None:
        if isinstance(width, int) and width > self.max_chars:
            raise _too_big(f"|center({width})", self.max_chars)

    def _pre_indent(self, _: Any, s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> None:
        step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        if step > self.max_chars:
            raise _too_big(f"|indent({width})", self.max_chars)
        if isinstance(s, str) and len(s) + (len(s.splitlines()) + 1) * step > self.max_chars:
            raise _too_big("|indent", self.max_chars)

    def _pre_format(self, _: Any, value: Any, *args: Any, **kwargs: Any) -> None:
        if percent_format_size(self.text(value, "|format"), kwargs or args, self.max_chars) > self.max_chars:
            raise _too_big("|format", self.max_chars)

    def _pre_replace(self, eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> None:
        text, old_text, new_text = (self.text(x, "an argument of |replace") for x in (s, old, new))
        factor = _ESCAPE_FACTOR if eval_ctx is not None and eval_ctx.autoescape else 1
        n = len(text) + 1 if not old_text else text.count(old_text)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        if len(text) * factor + n * (len(new_text) * factor - len(old_text)) > self.max_chars:
            raise _too_big("|replace", self.max_chars)

    def _pre_wordwrap(
        self,
        environment: Any,
        s: Any,
        width: int = 79,
        break_long_words: bool = True,
        wrapstring: str | None = None,
        break_on_hyphens: bool = True,
    ) -> None:
        text = self.text(s, "|wordwrap")
        joint = environment.newline_sequence if wrapstring is None else self.text(wrapstring, "|wordwrap")
        step = width if isinstance(width, int) and width > 0 else 1
        lines = len(text.split()) + text.count("-") + len(text) // step + text.count("\n") + 1
        if len(text) + lines * len(joint) > self.max_chars:
            raise _too_big("|wordwrap", self.max_chars)

    def _pre_urlize(
        self,
        eval_ctx: Any,
        value: Any,
        trim_url_limit: int | None = None,
        nofollow: bool = False,
        target: str | None = None,
        rel: str | None = None,
        extra_schemes: Any = None,
    ) -> None:
        policies = eval_ctx.environment.policies
        extra = sum(
            len(self.text(x or "", "|urlize")) for x in (target, rel, policies["urlize.rel"], policies["urlize.target"])
        )
        text = self.text(value, "|urlize")
        # Each word can become `<a href="https://WORD" rel=".." target="..">WORD</a>`, escaped.
        words = len(text.split())
        if len(text) * 2 * _ESCAPE_FACTOR + words * (64 + extra * _ESCAPE_FACTOR) > 4 * self.max_chars:
            raise _too_big("|urlize", self.max_chars)

    def _pre_tojson(self, _: Any, value: Any, indent: int | str | None = None) -> None:
        size, nodes, depth = shape_of(value, self.max_chars)
        step = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        if size > self.max_chars or nodes * depth * max(step, 0) > self.max_chars:
            raise _too_big("|tojson", self.max_chars)

    def _pre_pprint(self, _: Any, value: Any) -> None:
        size, nodes, depth = shape_of(value, self.max_chars)
        if size + nodes * depth > self.max_chars:
            raise _too_big("|pprint", self.max_chars)

    def _pre_batch(self, _: Any, value: Any, linecount: int, fill_with: Any = None) -> None:
        if fill_with is not None and isinstance(linecount, int):
            if linecount * (size_of(fill_with, self.max_chars) + 2) > self.max_chars:
                raise _too_big(f"|batch({linecount}) with a fill value", self.max_chars)

    def _pre_slice(self, _: Any, value: Any, slices: int, fill_with: Any = None) -> None:
        self._pre_batch(_, value, slices, fill_with)

    def _pre_round(self, _: Any, value: Any, precision: int = 0, method: str = "common") -> None:
        # 'ceil' and 'floor' compute 10**precision.
        if isinstance(precision, int) and abs(precision) > 1000:
            raise TemplateLimitExceeded(f"template error: |round precision {precision} is too large")

    @property
    def _join(self) -> Callable[..., str]:
        guard = self

        @pass_eval_context
        def join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
            if attribute is not None:
                value = map(make_attrgetter(eval_ctx.environment, attribute), value)
            items = guard.bounded_list(value)
            limit = guard.max_chars
            factor = _ESCAPE_FACTOR if eval_ctx.autoescape else 1
            total = len(guard.text(d, "|join")) * max(len(items) - 1, 0) * factor
            for item in items:
                if total > limit:
                    break
                total += _text_len(item, limit) * factor
            if total > limit:
                raise _too_big("|join", limit)
            return guard.check_result(sync_do_join(eval_ctx, items, d), "|join")

        return join

    @property
    def _sum(self) -> Callable[..., Any]:
        guard = self

        @pass_environment
        def sum_(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
            if attribute is not None:
                iterable = map(make_attrgetter(environment, attribute), iterable)
            if not isinstance(start, (list, tuple)):
                return sum(guard.bounded_iter(iterable), start)
            # sum() of lists copies the running total at every step: quadratic, in one C call.
            limit = guard.max_chars
            out = list(start)
            total = size_of(start, limit)
            for item in guard.bounded_iter(iterable):
                if not isinstance(item, list if isinstance(start, list) else tuple):
                    raise TypeError(
                        f"can only concatenate {type(start).__name__} "
                        f'(not "{type(item).__name__}") to {type(start).__name__}'
                    )
                total += size_of(item, limit)
                if total > limit:
                    raise _too_big("|sum", limit)
                out.extend(item)
            return out if isinstance(start, list) else tuple(out)

        return sum_


# Filters that stringify their value (`str(value)` of a huge structure is one C call).
_STRINGIFYING_FILTERS = frozenset(
    {
        "capitalize",
        "center",
        "e",
        "escape",
        "filesizeformat",
        "float",
        "forceescape",
        "format",
        "indent",
        "int",
        "lower",
        "replace",
        "safe",
        "string",
        "striptags",
        "title",
        "trim",
        "truncate",
        "upper",
        "urlencode",
        "urlize",
        "wordcount",
        "wordwrap",
        "xmlattr",
    }
)
# Filters that collect an iterable into memory.
_MATERIALIZING_FILTERS = frozenset(
    {
        "batch",
        "dictsort",
        "groupby",
        "list",
        "max",
        "min",
        "random",
        "reverse",
        "slice",
        "sort",
        "unique",
    }
)


# -- printf-style formatting ---------------------------------------------------------------------


def _star_arg(positional: tuple[Any, ...], index: int) -> int:
    value = positional[index] if index < len(positional) else 0
    return abs(value) if isinstance(value, int) else 0


def _digits(text: str, k: int, n: int) -> tuple[int, int]:
    start = k
    while k < n and "0" <= text[k] <= "9":
        k += 1
    if k == start:
        return 0, k
    run = text[start:k].lstrip("0")
    # Python refuses widths past sys.maxsize anyway; do not convert 5000 digits to find out.
    return (int(run) if len(run) <= 18 else 10**18) if run else 0, k


def _conversion_size(conversion: str, value: Any, precision: int, limit: int) -> int:
    if conversion == "s":
        return _text_len(value, limit)
    if conversion in "ra":
        return 10 * size_of(value, limit) + 2
    if conversion in "diu":
        return max(size_of(value, limit) if isinstance(value, int) else 320, precision) + 2
    if conversion in "oxX":
        return max(2 * size_of(value, limit) if isinstance(value, int) else 640, precision) + 2
    if conversion in "eEfFgG":
        return 320 + precision
    if conversion == "c":
        return 2
    return 0  # Python raises "unsupported format character"


def percent_format_size(fmt: str | bytes, values: Any, limit: int) -> int:
    """Upper bound of `len(fmt % values)`, parsed as CPython parses it (PyUnicode_Format)."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else str(fmt)
    factor = _ESCAPE_FACTOR if isinstance(fmt, Markup) else 1
    if isinstance(values, tuple):
        positional, mapping = values, None
    else:
        positional = (values,)
        mapping = values if isinstance(values, Mapping) else None
    n = len(text)
    total = i = arg = 0
    while True:
        j = text.find("%", i)
        if j < 0:
            return total + n - i
        total += j - i
        k = j + 1
        key = None
        if k < n and text[k] == "(":
            depth, k = 1, k + 1
            start = k
            while k < n and depth:
                depth += {"(": 1, ")": -1}.get(text[k], 0)
                k += 1
            key = text[start : k - 1]
        while k < n and text[k] in "-+ #0":
            k += 1
        if k < n and text[k] == "*":
            width, k, arg = _star_arg(positional, arg), k + 1, arg + 1
        else:
            width, k = _digits(text, k, n)
        precision = 0
        if k < n and text[k] == ".":
            k += 1
            if k < n and text[k] == "*":
                precision, k, arg = _star_arg(positional, arg), k + 1, arg + 1
            else:
                precision, k = _digits(text, k, n)
        if k < n and text[k] in "hlL":
            k += 1
        if k >= n:
            return total  # incomplete format: Python raises ValueError
        conversion = text[k]
        k += 1
        if conversion == "%":
            total += max(width, 1)
        else:
            if key is not None:
                try:
                    value = mapping[key] if mapping is not None else None
                except Exception:  # a missing key: Python raises KeyError before allocating
                    value = None
            else:
                value = positional[arg] if arg < len(positional) else None
                arg += 1
            total += max(width, _conversion_size(conversion, value, precision, limit) * factor)
        if total > limit:
            return total
        i = k


__all__ = [
    "SizeGuard",
    "TemplateLimitExceeded",
    "percent_format_size",
    "shape_of",
    "size_of",
    "DEFAULT_MAX_INT_BITS",
    "DEFAULT_MAX_RANGE",
]
