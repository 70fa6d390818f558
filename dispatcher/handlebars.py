"""Handlebars templates translated to Jinja2 source, so that they run in the one sandbox.

The predecessor stored its templates as Handlebars. Rather than running a second template engine
(the Python ports compile templates to Python source and have no sandbox nor size bounds), a
Handlebars template is translated once into Jinja2 source and compiled by `templating.Renderer`
like any other text: same sandbox, same limits, same helpers.

Supported: mustaches `{{path}}` (escaped in HTML bodies), `{{{path}}}` and `{{& path}}`; paths
with `this`, `./`, `../`, `@root`, `[literal]` segments and `.length`; `#if` / `#unless` (with
`includeZero=`), `#each` (`@index @key @first @last`, `as |item key|`), `#with` (`as |obj|`),
`{{else}}`, `{{^}}` and `{{else if ...}}` chains; comments; `~` whitespace control and the
standalone-line rule, ported from Handlebars.js 4.7's WhitespaceControl so that block tags alone
on their lines leave the same newlines; `\\{{` escapes; the helpers `dateNow`, `dateFormat`,
`toLocale` and `lookup`, with literals and subexpressions. Values print as Handlebars prints them
(`null` → "", `true` → "true", `[1,2]` → "1,2", `2.0` → "2") and conditions follow Handlebars'
truthiness (`{}` is true, `[]` is false). Anything else (partials, decorators, other helpers,
inverted sections `{{^x}}`, raw blocks) is a `HandlebarsSyntaxError` naming it and its line.
"""

from __future__ import annotations

import bisect
import functools
import keyword
import numbers
import re
from collections import abc
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import markupsafe
from jinja2 import TemplateSyntaxError, Undefined, pass_eval_context
from jinja2.defaults import DEFAULT_NAMESPACE

__all__ = ["HandlebarsSyntaxError", "Translation", "to_jinja", "translate"]

# Helpers of templating.Renderer, called the Handlebars way: name -> (min, max) arguments.
HELPERS: dict[str, tuple[int, int]] = {"dateNow": (0, 0), "dateFormat": (1, 3), "toLocale": (1, 2)}
_BLOCK_HELPERS = ("if", "unless", "each", "with")
# Nested blocks become nested Python blocks in Jinja's compiled code, and CPython refuses more
# than 20 nested loops (SyntaxError, not a TemplateError): stay well below.
MAX_NESTING = 16
MAX_CHAIN = 100  # `{{else if}}` links of one block: each one is a level of recursion here
MAX_PATH = 64  # segments of one path (`a.b.c`): Jinja's compiler recurses per segment


class HandlebarsSyntaxError(TemplateSyntaxError):
    """A Handlebars template that cannot be translated; the message starts with its line."""

    def __init__(self, message: str, lineno: int) -> None:
        super().__init__(f"line {lineno}: {message}", lineno)
        # Like Jinja's errors once reported: str() is the message alone, without a location suffix.
        self.translated = True


@dataclass(frozen=True, slots=True)
class Translation:
    """`jinja`: the Jinja2 source. `loops`: the template has an `#each`, the only construct whose
    cost is not bounded by the template's length and the output limit (nested, it multiplies:
    five levels over 100 items are 10**10 iterations); without one the template renders in time
    proportional to its text plus what it prints, and can be rendered inline."""

    jinja: str
    loops: bool


@functools.lru_cache(maxsize=512)  # like Renderer's compile cache: stored templates come back
def translate(source: str) -> Translation:
    """Translate Handlebars `source` into Jinja2 source for `templating.Renderer.compile`.

    The result expects the context `{"user": ..., "data": ...}` and the Renderer's helpers as
    globals. Raises `HandlebarsSyntaxError` (a `jinja2.TemplateSyntaxError`) for templates that
    do not parse or use what is not supported. The result is longer than `source` (per tag):
    check size limits on `source`.
    """
    parser = _Parser(source)
    program = parser.parse()
    _WhitespaceControl().program(program)
    generator = _Generator(parser.line)
    jinja = generator.translate(program)
    return Translation(jinja, generator.loops)


def to_jinja(source: str) -> str:
    """The Jinja2 source of Handlebars `source` (see `translate`)."""
    return translate(source).jinja


# --- Lexer: the rules of Handlebars.js' handlebars.l, in its order (first match wins) ---------

# JavaScript's \s, which is not Python's.
_WS_CHARS = (
    "\t\n\v\f\r \u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_S = _WS_CHARS  # inside [...]: none of them is special there
_LOOKAHEAD = "(?=[=~}" + _S + "/.)|])"
_LITERAL_LOOKAHEAD = "(?=[~}" + _S + ")])"
_ID = "[^" + _S + '!"#%-,./;->@\\[-\\^`{-~]+' + _LOOKAHEAD

# (regex, token kind or None to skip, leaves the mustache state)
_MU_RULES: list[tuple[str, str | None, bool]] = [
    (r"\(", "OPEN_SEXPR", False),
    (r"\)", "CLOSE_SEXPR", False),
    (r"\{\{\{\{", "OPEN_RAW_BLOCK", False),
    (r"\}\}\}\}", "CLOSE_RAW_BLOCK", True),
    (r"\{\{~?>", "OPEN_PARTIAL", False),
    (r"\{\{~?#>", "OPEN_PARTIAL_BLOCK", False),
    (r"\{\{~?#\*?", "OPEN_BLOCK", False),
    (r"\{\{~?/", "OPEN_ENDBLOCK", False),
    (r"\{\{~?\^[" + _S + r"]*~?\}\}", "INVERSE", True),
    (r"\{\{~?[" + _S + r"]*else[" + _S + r"]*~?\}\}", "INVERSE", True),
    (r"\{\{~?\^", "OPEN_INVERSE", False),
    (r"\{\{~?[" + _S + r"]*else(?![A-Za-z0-9_])", "OPEN_INVERSE_CHAIN", False),
    (r"\{\{~?\{", "OPEN_UNESCAPED", False),
    (r"\{\{~?&", "OPEN", False),
    (r"\{\{~?!(?=--)[\s\S]*?--~?\}\}", "COMMENT", True),
    (r"\{\{~?!--", "UNCLOSED_COMMENT", False),
    (r"\{\{~?![\s\S]*?\}\}", "COMMENT", True),
    (r"\{\{~?!", "UNCLOSED_COMMENT", False),
    (r"\{\{~?\*?", "OPEN", False),
    (r"=", "EQUALS", False),
    (r"\.\.", "ID", False),
    (r"\." + _LOOKAHEAD, "ID", False),
    (r"[/.]", "SEP", False),
    (r"[" + _S + r"]+", None, False),
    (r"\}~?\}\}", "CLOSE_UNESCAPED", True),
    (r"~?\}\}", "CLOSE", True),
    (r'"(?:\\"|[^"])*"', "STRING", False),
    (r"'(?:\\'|[^'])*'", "STRING", False),
    (r"@", "DATA", False),
    (r"(?:true|false)" + _LITERAL_LOOKAHEAD, "BOOLEAN", False),
    (r"undefined" + _LITERAL_LOOKAHEAD, "UNDEFINED", False),
    (r"null" + _LITERAL_LOOKAHEAD, "NULL", False),
    (r"-?[0-9]+(?:\.[0-9]+)?" + _LITERAL_LOOKAHEAD, "NUMBER", False),
    (r"as[" + _S + r"]+\|", "OPEN_BLOCK_PARAMS", False),
    (r"\|", "CLOSE_BLOCK_PARAMS", False),
    (_ID, "ID", False),
    (r"\[(?:\\\]|[^\]])*\]", "ID", False),
    (r"[\s\S]", "INVALID", False),
]
# One alternation tried in order at each position: the first rule that matches wins, as in jison.
_MU = re.compile("|".join(f"(?P<r{i}>{pattern})" for i, (pattern, _, _) in enumerate(_MU_RULES)))
# After `\{{`: the escaped mustache is text up to the next (possibly escaped) mustache.
_EMU = re.compile(r"[^\x00]{2,}?(?=\{\{|\\\{\{|\\\\\{\{|\Z)")
_UNSUPPORTED_OPENERS = {
    "OPEN_PARTIAL": "partials ({{> name}}) are not supported",
    "OPEN_PARTIAL_BLOCK": "partial blocks ({{#> name}}) are not supported",
    "OPEN_RAW_BLOCK": "raw blocks ({{{{raw}}}}) are not supported",
    "OPEN_INVERSE": "inverted sections ({{^name}}) are not supported: use {{#unless name}}",
}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    pos: int


def _tokenize(source: str, fail: Callable[[str, int], Exception]) -> list[_Token]:
    tokens: list[_Token] = []
    pos, end = 0, len(source)
    while pos < end:
        opening = source.find("{{", pos)
        if opening < 0:
            tokens.append(_Token("CONTENT", source[pos:], pos))
            break
        text, state = source[pos:opening], "mu"
        if text.endswith("\\\\"):
            text = text[:-1]  # `\\{{`: a literal backslash, then a real mustache
        elif text.endswith("\\"):
            text, state = text[:-1], "emu"
        if text:
            tokens.append(_Token("CONTENT", text, pos))
        pos = opening
        if state == "emu":
            match = _EMU.match(source, pos)
            assert match is not None  # `{{` is there, and NUL was refused
            tokens.append(_Token("CONTENT", match.group(), pos))
            pos = match.end()
            continue
        while True:  # inside a mustache, until its closing `}}`
            if pos >= end:
                raise fail("unclosed {{: no matching }}", opening)
            match = _MU.match(source, pos)
            assert match is not None and match.lastgroup is not None  # the last rule takes any character
            _, kind, pop = _MU_RULES[int(match.lastgroup[1:])]
            text = match.group()
            if kind == "INVALID":
                if source.find("}}", pos) < 0:
                    raise fail("unclosed {{: no matching }}", opening)
                raise fail(f"unexpected {text!r} in {_snippet(source, opening)}", pos)
            if kind == "UNCLOSED_COMMENT":
                raise fail("unclosed comment: no matching " + ("--}}" if "--" in text else "}}"), pos)
            if kind in _UNSUPPORTED_OPENERS:
                raise fail(f"{_snippet(source, pos)}: {_UNSUPPORTED_OPENERS[kind]}", pos)
            if kind in ("OPEN", "OPEN_BLOCK") and text.endswith("*"):
                raise fail(f"{_snippet(source, pos)}: decorators are not supported", pos)
            if kind is not None:
                tokens.append(_Token(kind, text, pos))
            pos = match.end()
            if pop:
                break
    tokens.append(_Token("EOF", "", end))
    return tokens


def _snippet(source: str, pos: int) -> str:
    close = source.find("}}", pos, pos + 60)
    return source[pos : close + 2] if close >= 0 else source[pos : pos + 30] + "..."


# --- Parser: handlebars.yy's grammar and the node shapes of its helpers.js -----------------------


@dataclass(frozen=True, slots=True)
class _Strip:
    open: bool = False
    close: bool = False


def _strip_flags(open_text: str, close_text: str) -> _Strip:
    return _Strip(open_text[2:3] == "~", close_text[-3:-2] == "~")


@dataclass(eq=False, slots=True)
class _Content:
    original: str
    value: str
    left_stripped: bool = False
    right_stripped: bool = False


@dataclass(eq=False, slots=True)
class _Comment:
    strip: _Strip


@dataclass(eq=False, slots=True)
class _Path:
    data: bool
    depth: int
    parts: list[str]
    original: str
    pos: int

    @property
    def scoped(self) -> bool:  # `this.x`, `./x`: never a helper nor a block parameter
        return bool(re.search(r"^\.|this(?![A-Za-z0-9_])", self.original))

    @property
    def simple_id(self) -> bool:
        return not self.data and not self.depth and len(self.parts) == 1 and not self.scoped


@dataclass(eq=False, slots=True)
class _Literal:
    kind: str  # STRING NUMBER BOOLEAN NULL UNDEFINED
    value: str
    pos: int


@dataclass(eq=False, slots=True)
class _Call:
    name: _Path | _Literal
    params: list[_Expr]
    hash: list[tuple[str, _Expr]]
    pos: int


@dataclass(eq=False, slots=True)
class _SubExpr:
    call: _Call


_Expr = _Path | _Literal | _SubExpr


@dataclass(eq=False, slots=True)
class _Mustache:
    call: _Call
    escaped: bool
    strip: _Strip


@dataclass(eq=False, slots=True)
class _Program:
    body: list[_Node]
    block_params: list[str] = field(default_factory=list)
    chained: bool = False


@dataclass(eq=False, slots=True)
class _Block:
    helper: str
    call: _Call
    program: _Program
    inverse: _Program | None
    open_strip: _Strip
    inverse_strip: _Strip | None
    close_strip: _Strip | None


_Node = _Content | _Comment | _Mustache | _Block


@dataclass(eq=False, slots=True)
class _InverseAndProgram:
    strip: _Strip
    program: _Program
    chain: bool


_PARAM_START = frozenset({"ID", "DATA", "STRING", "NUMBER", "BOOLEAN", "UNDEFINED", "NULL", "OPEN_SEXPR"})
_PROGRAM_END = frozenset({"EOF", "OPEN_ENDBLOCK", "INVERSE", "OPEN_INVERSE_CHAIN"})


class _Parser:
    def __init__(self, source: str) -> None:
        self._newlines = [i for i, char in enumerate(source) if char == "\n"]
        nul = source.find("\x00")
        if nul >= 0:
            raise self.error("NUL character in template", nul)
        self._tokens = _tokenize(source, self.error)
        self._i = 0
        self._sexpr_depth = 0

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def error(self, message: str, pos: int) -> HandlebarsSyntaxError:
        return HandlebarsSyntaxError(message, self.line(pos))

    def _peek(self, ahead: int = 0) -> _Token:
        return self._tokens[min(self._i + ahead, len(self._tokens) - 1)]

    def _next(self) -> _Token:
        token = self._peek()
        self._i += 1
        return token

    def _expect(self, kind: str, what: str) -> _Token:
        token = self._peek()
        if token.kind != kind:
            found = "the end of the template" if token.kind == "EOF" else repr(token.text)
            raise self.error(f"expected {what}, found {found}", token.pos)
        return self._next()

    def parse(self) -> _Program:
        program = self._program(0)
        token = self._peek()
        if token.kind == "OPEN_ENDBLOCK":
            self._next()
            name = self._helper_name()
            raise self.error(f"{{{{/{_original(name)}}}}} closes no open block", token.pos)
        if token.kind != "EOF":
            raise self.error("{{else}} outside a block", token.pos)
        return program

    def _program(self, depth: int) -> _Program:
        if depth > MAX_NESTING:
            raise self.error(f"blocks nested more than {MAX_NESTING} deep", self._peek().pos)
        body: list[_Node] = []
        while self._peek().kind not in _PROGRAM_END:
            body.append(self._statement(depth))
        return _Program(body)

    def _statement(self, depth: int) -> _Node:
        token = self._next()
        if token.kind == "CONTENT":
            return _Content(token.text, token.text)
        if token.kind == "COMMENT":
            return _Comment(_strip_flags(token.text, token.text))
        if token.kind in ("OPEN", "OPEN_UNESCAPED"):
            call, block_params = self._call()
            if block_params:
                raise self.error("block parameters (as |x|) outside a block", token.pos)
            if token.kind == "OPEN":
                close = self._expect("CLOSE", "}}")
                escaped = not token.text.endswith("&")
            else:
                close = self._expect("CLOSE_UNESCAPED", "}}}")
                escaped = False
            return _Mustache(call, escaped, _strip_flags(token.text, close.text))
        if token.kind == "OPEN_BLOCK":
            return self._block(token, depth)
        raise self.error(f"unexpected {token.text!r}", token.pos)

    def _block(self, opening: _Token, depth: int) -> _Block:
        call, block_params = self._call()
        close = self._expect("CLOSE", "}}")
        helper = self._check_block(call, block_params)
        program = self._program(depth + 1)
        program.block_params = block_params
        inverse = self._inverse(depth, 0)
        ending = self._peek()
        if ending.kind in ("INVERSE", "OPEN_INVERSE_CHAIN"):
            raise self.error(
                f"a second {{{{else}}}} in {{{{#{_original(call.name)}}}}} (line {self.line(opening.pos)})", ending.pos
            )
        if ending.kind != "OPEN_ENDBLOCK":
            raise self.error(f"unclosed {{{{#{_original(call.name)}}}}}", opening.pos)
        self._next()
        name = self._helper_name()
        end_close = self._expect("CLOSE", "}}")
        if _original(name) != _original(call.name):
            raise self.error(
                f"{{{{/{_original(name)}}}}} does not close {{{{#{_original(call.name)}}}}}"
                f" (line {self.line(opening.pos)})",
                ending.pos,
            )
        return _prepare_block(
            helper,
            call,
            _strip_flags(opening.text, close.text),
            program,
            inverse,
            _strip_flags(ending.text, end_close.text),
        )

    def _inverse(self, depth: int, links: int) -> _InverseAndProgram | None:
        token = self._peek()
        if token.kind == "INVERSE":
            self._next()
            return _InverseAndProgram(_strip_flags(token.text, token.text), self._program(depth + 1), False)
        if token.kind != "OPEN_INVERSE_CHAIN":
            return None
        if links >= MAX_CHAIN:
            raise self.error(f"more than {MAX_CHAIN} {{{{else ...}}}} in one block", token.pos)
        self._next()
        call, block_params = self._call()
        close = self._expect("CLOSE", "}}")
        helper = self._check_block(call, block_params)
        strip = _strip_flags(token.text, close.text)
        # `{{else if}}` becomes an `elif` of the same Jinja block; `{{else each}}` nests one.
        program = self._program(depth + (1 if helper in ("if", "unless") else 2))
        program.block_params = block_params
        rest = self._inverse(depth, links + 1)
        block = _prepare_block(helper, call, strip, program, rest, rest.strip if rest else None)
        return _InverseAndProgram(strip, _Program([block], chained=True), True)

    def _check_block(self, call: _Call, block_params: list[str]) -> str:
        name = call.name
        label = f"{{{{#{_original(name)}}}}}"
        if not (isinstance(name, _Path) and name.simple_id and name.parts[0] in _BLOCK_HELPERS):
            raise self.error(f"unknown block helper {label} (supported: #if, #unless, #each, #with)", call.pos)
        helper = name.parts[0]
        if len(call.params) != 1:
            raise self.error(f"{label} takes exactly one argument", call.pos)
        for key, _ in call.hash:
            if not (key == "includeZero" and helper in ("if", "unless")):
                raise self.error(f"{label} does not support the hash argument {key}=", call.pos)
        allowed = {"each": 2, "with": 1}.get(helper, 0)
        if len(block_params) > allowed:
            raise self.error(f"{label} takes at most {allowed} block parameters (as |...|)", call.pos)
        return helper

    def _call(self) -> tuple[_Call, list[str]]:
        start = self._peek()
        name = self._helper_name()
        params: list[_Expr] = []
        while self._peek().kind in _PARAM_START and not self._at_hash():
            params.append(self._param())
        hash_: list[tuple[str, _Expr]] = []
        while self._at_hash():
            key = _id(self._next().text)
            self._next()
            hash_.append((key, self._param()))
        block_params: list[str] = []
        if self._peek().kind == "OPEN_BLOCK_PARAMS":
            self._next()
            while self._peek().kind == "ID":
                block_params.append(_id(self._next().text))
            if not block_params:
                raise self.error("empty block parameters (as ||)", self._peek().pos)
            self._expect("CLOSE_BLOCK_PARAMS", "|")
        return _Call(name, params, hash_, start.pos), block_params

    def _at_hash(self) -> bool:
        return self._peek().kind == "ID" and self._peek(1).kind == "EQUALS"

    def _param(self) -> _Expr:
        if self._peek().kind != "OPEN_SEXPR":
            return self._helper_name()
        opening = self._next()
        self._sexpr_depth += 1
        if self._sexpr_depth > MAX_NESTING:
            raise self.error(f"subexpressions nested more than {MAX_NESTING} deep", opening.pos)
        call, block_params = self._call()
        if block_params:
            raise self.error("block parameters (as |x|) in a subexpression", opening.pos)
        self._expect("CLOSE_SEXPR", ")")
        self._sexpr_depth -= 1
        return _SubExpr(call)

    def _helper_name(self) -> _Path | _Literal:
        token = self._next()
        if token.kind == "ID":
            return self._path(token, data=False)
        if token.kind == "DATA":
            return self._path(self._expect("ID", "a name after @"), data=True)
        if token.kind in ("STRING", "NUMBER", "BOOLEAN", "UNDEFINED", "NULL"):
            value = token.text
            if token.kind == "STRING":
                quote = value[0]
                value = value[1:-1].replace("\\" + quote, quote)
            return _Literal(token.kind, value, token.pos)
        found = "the end of the template" if token.kind == "EOF" else repr(token.text)
        raise self.error(f"expected a name or a value, found {found}", token.pos)

    def _path(self, first: _Token, *, data: bool) -> _Path:
        segments = [(first.text, "")]
        while self._peek().kind == "SEP":
            separator = self._next().text
            token = self._peek()
            if token.kind != "ID":
                hint = f" (write [{token.text}] for an index)" if token.kind == "NUMBER" else ""
                raise self.error(f"expected a name after {separator!r}{hint}", token.pos)
            segments.append((self._next().text, separator))
        if len(segments) > MAX_PATH:  # Jinja's compiler recurses once per segment
            raise self.error(f"path longer than {MAX_PATH} segments", first.pos)
        # helpers.js preparePath: leading `this`, `.` and `..` are operators, not names.
        original, depth = "@" if data else "", 0
        parts: list[str] = []
        for raw, separator in segments:
            part = _id(raw)
            original += separator + part
            if raw in ("..", ".", "this"):
                if parts:
                    raise self.error(f"invalid path {original}", first.pos)
                depth += raw == ".."
            else:
                parts.append(part)
        return _Path(data, depth, parts, original, first.pos)


def _id(token: str) -> str:
    if token.startswith("["):
        token = re.sub(r"\\([\\\]])", r"\1", token)
        if re.fullmatch(r"\[[^\n\r\u2028\u2029]*\]", token):
            return token[1:-1]
    return token


def _original(name: _Path | _Literal) -> str:
    return name.original if isinstance(name, _Path) else name.value


def _prepare_block(
    helper: str,
    call: _Call,
    open_strip: _Strip,
    program: _Program,
    inverse: _InverseAndProgram | None,
    close_strip: _Strip | None,
) -> _Block:
    # helpers.js prepareBlock, including how it hands strip flags down an `else if` chain.
    if inverse is not None and inverse.chain:
        chained = inverse.program.body[0]
        assert isinstance(chained, _Block)
        chained.close_strip = close_strip
    return _Block(
        helper,
        call,
        program,
        inverse.program if inverse else None,
        open_strip,
        inverse.strip if inverse else None,
        close_strip,
    )


# --- Whitespace: a port of Handlebars.js' compiler/whitespace-control.js -------------------------


class _WhitespaceControl:
    def __init__(self) -> None:
        self._root_seen = False

    def program(self, program: _Program) -> None:
        is_root = not self._root_seen
        self._root_seen = True
        body = program.body
        for i, current in enumerate(body):
            strip = self._accept(current)
            if strip is None:
                continue
            prev_ws = _is_prev_whitespace(body, i, is_root)
            next_ws = _is_next_whitespace(body, i, is_root)
            open_standalone = strip.get("openStandalone") and prev_ws
            close_standalone = strip.get("closeStandalone") and next_ws
            inline_standalone = strip.get("inlineStandalone") and prev_ws and next_ws
            if strip.get("close"):
                _omit_right(body, i, True)
            if strip.get("open"):
                _omit_left(body, i, True)
            if inline_standalone:
                _omit_right(body, i)
                _omit_left(body, i)
            if open_standalone:
                assert isinstance(current, _Block)
                _omit_right(current.program.body)
                _omit_left(body, i)
            if close_standalone:
                assert isinstance(current, _Block)
                _omit_right(body, i)
                _omit_left((current.inverse or current.program).body)

    def _accept(self, node: _Node) -> dict[str, bool] | None:
        if isinstance(node, _Content):
            return None
        if isinstance(node, _Mustache):
            return {"open": node.strip.open, "close": node.strip.close}
        if isinstance(node, _Comment):
            return {"inlineStandalone": True, "open": node.strip.open, "close": node.strip.close}
        return self._block(node)

    def _block(self, block: _Block) -> dict[str, bool]:
        self.program(block.program)
        if block.inverse is not None:
            self.program(block.inverse)
        program, inverse = block.program, block.inverse
        first_inverse = last_inverse = inverse
        if inverse is not None and inverse.chained:
            first_inverse = _chained_block(inverse).program
            while last_inverse is not None and last_inverse.chained:
                last_inverse = _chained_block(last_inverse).program
        close_strip = block.close_strip or _Strip()
        strip = {
            "open": block.open_strip.open,
            "close": close_strip.close,
            "openStandalone": _is_next_whitespace(program.body),
            "closeStandalone": _is_prev_whitespace((first_inverse or program).body),
        }
        if block.open_strip.close:
            _omit_right(program.body, None, True)
        if inverse is not None:
            assert first_inverse is not None and last_inverse is not None
            inverse_strip = block.inverse_strip or _Strip()
            if inverse_strip.open:
                _omit_left(program.body, None, True)
            if inverse_strip.close:
                _omit_right(first_inverse.body, None, True)
            if close_strip.open:
                _omit_left(last_inverse.body, None, True)
            # A standalone {{else}}.
            if _is_prev_whitespace(program.body) and _is_next_whitespace(first_inverse.body):
                _omit_left(program.body)
                _omit_right(first_inverse.body)
        elif close_strip.open:
            _omit_left(program.body, None, True)
        return strip


def _chained_block(program: _Program) -> _Block:
    block = program.body[-1]
    assert isinstance(block, _Block)
    return block


def _trailing_ws(text: str) -> str:
    return text[len(text.rstrip(_WS_CHARS)) :]


def _leading_ws(text: str) -> str:
    return text[: len(text) - len(text.lstrip(_WS_CHARS))]


# The regexes of whitespace-control.js, as linear string operations (/\r?\n\s*?$/ and the like
# backtrack quadratically on long runs of blanks).
def _is_prev_whitespace(body: list[_Node], i: int | None = None, is_root: bool = False) -> bool:
    i = len(body) if i is None else i
    if i - 1 < 0:
        return is_root
    prev = body[i - 1]
    if not isinstance(prev, _Content):
        return False
    tail = _trailing_ws(prev.original)
    if i - 2 >= 0 or not is_root:
        return "\n" in tail
    return "\n" in tail or len(tail) == len(prev.original)


def _is_next_whitespace(body: list[_Node], i: int | None = None, is_root: bool = False) -> bool:
    i = -1 if i is None else i
    if i + 1 >= len(body):
        return is_root
    nxt = body[i + 1]
    if not isinstance(nxt, _Content):
        return False
    head = _leading_ws(nxt.original)
    if i + 2 < len(body) or not is_root:
        return "\n" in head
    return "\n" in head or len(head) == len(nxt.original)


_LINE_START = re.compile(r"[ \t]*\r?\n?")


def _omit_right(body: list[_Node], i: int | None = None, multiple: bool = False) -> None:
    index = 0 if i is None else i + 1
    current = body[index] if index < len(body) else None
    if not isinstance(current, _Content) or (not multiple and current.right_stripped):
        return
    original = current.value
    if multiple:
        current.value = original.lstrip(_WS_CHARS)
    else:
        match = _LINE_START.match(original)
        assert match is not None
        current.value = original[match.end() :]
    current.right_stripped = current.value != original


def _omit_left(body: list[_Node], i: int | None = None, multiple: bool = False) -> None:
    index = len(body) - 1 if i is None else i - 1
    current = body[index] if 0 <= index < len(body) else None
    if not isinstance(current, _Content) or (not multiple and current.left_stripped):
        return
    original = current.value
    current.value = original.rstrip(_WS_CHARS) if multiple else original.rstrip(" \t")
    current.left_stripped = current.value != original


# --- Jinja generation -------------------------------------------------------------------------

# Generated names all start with `_hb`; user paths at the top level only reach names that are
# plain identifiers and not Jinja's own (globals, keywords, `loop`...), others are undefined.
_UNDEFINED = "_hb_u"
_RESERVED = (
    frozenset(DEFAULT_NAMESPACE)
    | frozenset(HELPERS)
    | {
        "true",
        "false",
        "none",
        "loop",
        "self",
        "caller",
        "varargs",
        "kwargs",
        "super",
    }
)
_ROOT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Jinja cannot name its whole context: `this` at the top level is rebuilt from the Renderer's
# context keys.
_ROOT_THIS = "{" + ", ".join(f'"{key}": {key}' for key in ("user", "data")) + "}"


def printed(value: Any, escape: bool) -> str:
    """What `{{path}}` (`escape`: in an HTML body) or `{{{path}}}` prints for `value`."""
    # How Handlebars' escapeExpression turns values into text: null/undefined print nothing,
    # booleans in lower case, arrays joined with commas, objects as JavaScript prints them.
    # Callables only come from Python methods found where a key is missing: print nothing.
    if isinstance(value, str):
        return str(markupsafe.escape(value)) if escape else str(value)
    if value is None or isinstance(value, Undefined) or callable(value):
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if isinstance(value, abc.Mapping):
        return "[object Object]"
    try:
        items = iter(value)
    except TypeError:
        return str(markupsafe.escape(value)) if escape else str(value)
    return ",".join(printed(item, escape) for item in items)


@pass_eval_context
def _print_escaped(eval_ctx: Any, value: Any) -> str:
    """`{{path}}`: escaped in HTML bodies (the result is then marked safe, not escaped twice)."""
    if eval_ctx.autoescape:
        return markupsafe.Markup(printed(value, True))
    return printed(value, False)


@pass_eval_context
def _print_raw(eval_ctx: Any, value: Any) -> str:
    """`{{{path}}}`, `{{& path}}`: never escaped."""
    text = printed(value, False)
    return markupsafe.Markup(text) if eval_ctx.autoescape else text


def _truthy(value: Any, include_zero: bool) -> bool:
    """Handlebars' truthiness for #if/#unless/#with: [] is false, {} is true, 0 is false unless
    includeZero (and always true for #with)."""
    if callable(value):
        return False
    if value or isinstance(value, abc.Mapping):
        return True
    return bool(include_zero and isinstance(value, numbers.Number) and not isinstance(value, bool) and value == 0)


# Globals the translations call, for templating.Renderer's environments. Python functions rather
# than Jinja macros: a macro call per mustache cost more than the rest of a plain rendering.
RUNTIME: dict[str, Any] = {"_hb_e": _print_escaped, "_hb_r": _print_raw, "_hb_t": _truthy}


@dataclass(slots=True)
class _Frame:
    """The @data of one #each."""

    n: int
    used: set[str] = field(default_factory=set)

    def var(self, name: str) -> str | None:
        letter = {"index": "i", "key": "k", "first": "f", "last": "l"}.get(name)
        if letter is None:
            return None
        self.used.add(name)
        return f"_hb_{letter}{self.n}"


class _Generator:
    def __init__(self, line: Callable[[int], int]) -> None:
        self._line = line
        self._count = 0
        self._contexts: list[str | None] = [None]  # `this` of each context depth; None: the root
        self._params: list[dict[str, str]] = []
        self._frames: list[_Frame] = []
        self.loops = False

    def translate(self, program: _Program) -> str:
        body = "".join(self._program(program))
        if body.endswith("\n"):  # Jinja drops a template's final newline; Handlebars does not
            body = body[:-1] + '{{ "\\n" }}'
        return body

    def _error(self, message: str, pos: int) -> HandlebarsSyntaxError:
        return HandlebarsSyntaxError(message, self._line(pos))

    def _fresh(self) -> int:
        self._count += 1
        return self._count

    def _use(self, helper: str) -> str:
        return helper  # a global of the Renderer (RUNTIME)

    def _program(self, program: _Program) -> list[str]:
        out: list[str] = []
        for node in program.body:
            if isinstance(node, _Content):
                out.append(_text(node.value))
            elif isinstance(node, _Mustache):
                macro = self._use("_hb_e" if node.escaped else "_hb_r")
                out.append(f"{{{{ {macro}({self._mustache(node.call)}) }}}}")
            elif isinstance(node, _Block):
                out.extend(self._block(node))
        return out

    def _block(self, block: _Block) -> list[str]:
        if block.helper in ("if", "unless"):
            out = [f"{{% if {self._condition(block)} %}}", *self._program(block.program)]
            inverse = block.inverse
            while inverse is not None and inverse.chained and _chained_block(inverse).helper in ("if", "unless"):
                link = _chained_block(inverse)
                out += [f"{{% elif {self._condition(link)} %}}", *self._program(link.program)]
                inverse = link.inverse
            if inverse is not None:
                out += ["{% else %}", *self._program(inverse)]
            return out + ["{% endif %}"]
        n = self._fresh()
        subject = self._expr(block.call.params[0])
        names = block.program.block_params
        if block.helper == "with":
            this = f"_hb_w{n}"
            subject_node = block.call.params[0]
            # Handlebars adds a depth for `../` only when the context changes: not for `#with this`.
            same = isinstance(subject_node, _Path) and not (
                subject_node.data or subject_node.depth or subject_node.parts
            )
            body = self._scoped(block.program, None if same else this, dict(zip(names, [this])), None)
            out = [f"{{% set {this} = {subject} %}}{{% if {self._use('_hb_t')}({this}, true) %}}", *body]
            if block.inverse is not None:
                out += ["{% else %}", *self._program(block.inverse)]
            return out + ["{% endif %}"]
        # each: arrays by index, objects by key in insertion order; anything else is empty.
        self.loops = True
        seq, is_map, item, this = f"_hb_s{n}", f"_hb_m{n}", f"_hb_x{n}", f"_hb_v{n}"
        frame = _Frame(n)
        params = {names[0]: this} if names else {}
        if len(names) > 1:
            params[names[1]] = frame.var("key") or ""
        body = self._scoped(block.program, this, params, frame)
        out = [
            f"{{% set {seq} = {subject} %}}{{% set {is_map} = {seq} is mapping %}}"
            f"{{% for {item} in ({seq}.items() if {is_map} else {seq}"
            f" if {seq} is iterable and {seq} is not string else []) %}}"
            f"{{% set {this} = {item}[1] if {is_map} else {item} %}}"
        ]
        loop_vars = {
            "index": "loop.index0",
            "first": "loop.first",
            "last": "loop.last",
            "key": f"{item}[0] if {is_map} else loop.index0",
        }
        for name, value in loop_vars.items():
            if name in frame.used:
                out.append(f"{{% set {frame.var(name)} = {value} %}}")
        out += body
        if block.inverse is not None:
            out += ["{% else %}", *self._program(block.inverse)]
        return out + ["{% endfor %}"]

    def _scoped(self, program: _Program, this: str | None, params: dict[str, str], frame: _Frame | None) -> list[str]:
        if this is not None:
            self._contexts.append(this)
        self._params.append(params)
        if frame is not None:
            self._frames.append(frame)
        try:
            return self._program(program)
        finally:
            if this is not None:
                self._contexts.pop()
            self._params.pop()
            if frame is not None:
                self._frames.pop()

    def _condition(self, block: _Block) -> str:
        zero = dict(block.call.hash).get("includeZero")
        test = f"{self._use('_hb_t')}({self._expr(block.call.params[0])}, {self._expr(zero) if zero else 'false'})"
        return f"not {test}" if block.helper == "unless" else test

    def _mustache(self, call: _Call) -> str:
        name = call.name
        if call.params or call.hash:
            return self._helper(call)
        if isinstance(name, _Literal):  # {{"a b"}} looks up the key "a b", as in Handlebars
            name = _Path(False, 0, [name.value], name.value, name.pos)
        if name.simple_id and not self._block_param(name.parts[0]):
            if name.parts[0] in HELPERS or name.parts[0] in _BLOCK_HELPERS or name.parts[0] == "lookup":
                return self._helper(call)
        return self._path(name)

    def _helper(self, call: _Call) -> str:
        name = call.name
        label = _original(name)
        if not (isinstance(name, _Path) and name.simple_id) or (
            label not in HELPERS and label not in _BLOCK_HELPERS and label != "lookup"
        ):
            raise self._error(f"unknown helper {label!r} (helpers: {', '.join(HELPERS)}, lookup)", call.pos)
        if label in _BLOCK_HELPERS:
            raise self._error(f"{label} is a block helper: write {{{{#{label} ...}}}}...{{{{/{label}}}}}", call.pos)
        if call.hash:
            raise self._error(f"{label} does not take hash arguments ({call.hash[0][0]}=)", call.pos)
        low, high = HELPERS.get(label, (2, 2))
        if not low <= len(call.params) <= high:
            count = f"{low}" if low == high else f"{low} to {high}"
            raise self._error(f"{label} takes {count} arguments, not {len(call.params)}", call.pos)
        args = [self._expr(param) for param in call.params]
        if label == "lookup":
            return f"({args[0]})[{args[1]}]"
        return f"{label}({', '.join(args)})"

    def _expr(self, node: _Expr) -> str:
        if isinstance(node, _SubExpr):
            return self._helper(node.call)
        if isinstance(node, _Path):
            return self._path(node)
        if node.kind == "STRING":
            return _string(node.value)
        if node.kind == "NUMBER":
            if len(node.value) > 30:
                raise self._error(f"number {node.value[:30]}... is too long", node.pos)
            return str(int(node.value)) if "." not in node.value else repr(float(node.value))
        return {"BOOLEAN": node.value, "NULL": "none", "UNDEFINED": _UNDEFINED}[node.kind]

    def _block_param(self, name: str) -> str | None:
        for params in reversed(self._params):
            if name in params:
                return params[name]
        return None

    def _path(self, path: _Path) -> str:
        parts = path.parts
        if path.data:
            if parts[0] == "root":
                return self._lookup(None, parts[1:], path)
            index = len(self._frames) - 1 - path.depth
            var = self._frames[index].var(parts[0]) if index >= 0 else None
            return self._lookup(var or _UNDEFINED, parts[1:], path)
        if not path.depth and not path.scoped and parts:
            param = self._block_param(parts[0])
            if param is not None:
                return self._lookup(param, parts[1:], path)
        index = len(self._contexts) - 1 - path.depth
        if index < 0:  # above the top: undefined, as in Handlebars
            return _UNDEFINED
        return self._lookup(self._contexts[index], parts, path)

    def _lookup(self, base: str | None, parts: list[str], path: _Path) -> str:
        if base is None and not parts:
            base = _ROOT_THIS
        elif base is None:
            name, parts = parts[0], parts[1:]
            ok = _ROOT_NAME.fullmatch(name) and not keyword.iskeyword(name) and name not in _RESERVED
            base = name if ok else _UNDEFINED
        length = bool(parts) and parts[-1] == "length"
        subscripts = [
            f"[{part}]" if part.isdigit() and len(part) < 10 and str(int(part)) == part else f"[{_string(part)}]"
            for part in (parts[:-1] if length else parts)
        ]
        base += "".join(subscripts)
        if length:  # JavaScript's .length of arrays and strings; a key "length" of an object
            base = (
                f"({base}|length if {base} is defined and {base} is not mapping"
                f' and {base} is sequence else {base}["length"])'
            )
        return base


def _string(value: str) -> str:
    """A Jinja string literal for `value`: Jinja unescapes literals with `unicode-escape` after
    normalising newlines, so backslashes, quotes and line breaks are escaped, the rest kept."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


_TEXT_SPECIAL = re.compile(r"[{\r]")


def _text(value: str) -> str:
    # Only `{` can start Jinja syntax in template data (`{{`, `{%`, `{#`, also when our own tag
    # follows); `\r` would be normalised to `\n` by Jinja's lexer.
    return _TEXT_SPECIAL.sub(lambda m: '{{ "{" }}' if m.group() == "{" else '{{ "\\r" }}', value)
