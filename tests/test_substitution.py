"""Templates of nothing but text and `{{path}}`s render without Jinja (`templating._substitution`):
the same text, or the same error, as Jinja renders them, whatever the user and the data hold."""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import Template

from dispatcher import templating
from dispatcher.errors import RenderError
from dispatcher.handlebars import to_jinja
from dispatcher.templating import Renderer

LIMIT = 200

# Keys that are dict methods too (Jinja looks a missing key up as an attribute, and the sandbox
# refuses the ones that modify), keys with characters HTML escapes, and plain ones.
KEYS = st.sampled_from(["name", "code", "a", "items", "get", "pop", "update", "keys", "x<y", "0"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet="ab <>&\"'é\n", max_size=8),
    st.text(alphabet="x", min_size=LIMIT - 5, max_size=LIMIT + 5),  # about the output limit
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=6,
)
CONTEXTS = st.fixed_dictionaries(
    {"user": st.dictionaries(KEYS, VALUES, max_size=4), "data": st.dictionaries(KEYS, VALUES, max_size=4)}
)


def paths(context: dict[str, Any]) -> st.SearchStrategy[str]:
    """A dotted path into `context`, mostly through keys it has (one it lacks, now and then)."""

    @st.composite
    def walk(draw: st.DrawFn) -> str:
        root = draw(st.sampled_from(["user", "data"]))
        keys: list[str] = []
        node: Any = context[root]
        while not keys or draw(st.booleans()):
            present = sorted(k for k in node if k.isidentifier()) if isinstance(node, dict) else []
            key = draw(
                st.sampled_from(present) if present and draw(st.integers(0, 5)) else KEYS.filter(str.isidentifier)
            )
            keys.append(key)
            node = node.get(key) if isinstance(node, dict) else None
        return ".".join([root, *keys])

    return walk()


@st.composite
def templates(draw: st.DrawFn, context: dict[str, Any]) -> str:
    pieces = draw(
        st.lists(
            st.one_of(
                st.text(alphabet="Hi, <b>&.\n", max_size=6),
                paths(context).map(lambda p: "{{" + p + "}}"),
                paths(context).map(lambda p: "{{{" + p + "}}}"),
            ),
            min_size=1,
            max_size=5,
        )
    )
    return "".join(pieces)


def renderers() -> tuple[Renderer, Renderer]:
    make = lambda: Renderer(default_locale="en-US", max_template_chars=10_000, max_rendered_chars=LIMIT)  # noqa: E731
    return make(), make()


FAST, JINJA = renderers()


# Compiled as `plan.py` compiles a Handlebars translation without `#each`: to render inline.
def outcome(renderer: Renderer, source: str, html: bool, context: dict[str, Any], jinja_only: bool) -> str:
    if jinja_only:
        with patch.object(templating, "_substitution", lambda tree, html: None):
            text = renderer.compile(source, html=html, inline=True)
    else:
        text = renderer.compile(source, html=html, inline=True)
    try:
        return text(context)
    except RenderError as exc:
        return f"RenderError: {exc}"


@settings(max_examples=400, deadline=None)
@given(data=st.data(), context=CONTEXTS, html=st.booleans())
def test_renders_what_jinja_renders(data: st.DataObject, context: dict[str, Any], html: bool) -> None:
    source = to_jinja(data.draw(templates(context)))
    assert outcome(FAST, source, html, context, False) == outcome(JINJA, source, html, context, True)


def test_such_a_template_never_reaches_jinja() -> None:
    fast, _ = renderers()
    plain = fast.compile(to_jinja("Hi {{user.name}}, {{{data.code}}}!"), html=True, inline=True)
    branching = fast.compile(to_jinja("{{#if user.name}}Hi{{/if}}"), inline=True)
    context = {"user": {"name": "<Ada>"}, "data": {"code": "<b>1</b>"}}

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("rendered by Jinja")

    with patch.object(Template, "generate", refuse):
        assert plain(context) == "Hi &lt;Ada&gt;, <b>1</b>!"
        with pytest.raises(RenderError, match="rendered by Jinja"):
            branching(context)


def test_what_it_cannot_print_goes_to_jinja() -> None:
    fast, _ = renderers()
    text = fast.compile(to_jinja("{{user.name.first}} {{data.pop}}"), inline=True)
    # A string has no key: Jinja prints nothing for it; `pop` is refused by the sandbox.
    with pytest.raises(RenderError, match="unsafe"):
        text({"user": {"name": "Ada"}, "data": {}})
    assert fast.compile(to_jinja("[{{user.name.first}}]"), inline=True)({"user": {"name": "Ada"}, "data": {}}) == "[]"
