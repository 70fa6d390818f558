"""Handlebars templates of the predecessor, translated to Jinja and rendered in the sandbox.

Expected outputs are what Handlebars.js 4.7.8 renders for the same template and context (checked
with the npm package outside this suite), except where a comment says otherwise: HTML escaping is
Jinja's, whose entities differ (`&#34;` for `&quot;`).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from jinja2 import TemplateSyntaxError

from dispatcher.errors import RenderError
from dispatcher.handlebars import HandlebarsSyntaxError, to_jinja
from dispatcher.templating import Renderer


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    # The translation is longer than its Handlebars source: the template limit is not under test.
    return Renderer(default_locale="en-US", max_template_chars=100_000, max_rendered_chars=10_000)


def render(
    renderer: Renderer,
    source: str,
    html: bool = False,
    *,
    user: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> str:
    return renderer.compile(to_jinja(source), html=html).render_here({"user": user or {}, "data": data or {}})


WELCOME = """\
Hello{{#if user.name}} {{user.name}}{{/if}},

{{#if user.plan}}
Thanks for choosing the {{user.plan}} plan.
{{else}}
Your free trial lasts {{data.trialDays}} days.
{{/if}}

The team
"""


def test_welcome_email_with_if_else_on_their_own_lines(renderer: Renderer) -> None:
    assert render(renderer, WELCOME, user={"name": "Ada", "plan": "pro"}) == (
        "Hello Ada,\n\nThanks for choosing the pro plan.\n\nThe team\n"
    )
    assert render(renderer, WELCOME, user={"name": None}, data={"trialDays": 14}) == (
        "Hello,\n\nYour free trial lasts 14 days.\n\nThe team\n"
    )


RECEIPT = """\
<h1>Receipt for {{user.name}}</h1>
<table>
  {{#each data.items}}
  <tr class="{{#if @last}}last{{else}}row{{/if}}">
    <td>{{@index}}</td><td>{{name}}</td><td>{{qty}} x {{price}} {{../data.currency}}</td>
  </tr>
  {{else}}
  <tr><td>No items</td></tr>
  {{/each}}
</table>
{{{data.footer}}}
"""


def test_html_receipt_rows_escape_values_but_not_triple_stash(renderer: Renderer) -> None:
    data = {
        "currency": "EUR",
        "footer": "<p>Paid by <i>card</i></p>",
        "items": [
            {"name": "Tea & biscuits", "qty": 2, "price": "3.50"},
            {"name": "<b>Cake</b>", "qty": 1, "price": "4.00"},
        ],
    }
    assert render(renderer, RECEIPT, html=True, user={"name": "Ada <admin>"}, data=data) == (
        "<h1>Receipt for Ada &lt;admin&gt;</h1>\n"
        "<table>\n"
        '  <tr class="row">\n'
        "    <td>0</td><td>Tea &amp; biscuits</td><td>2 x 3.50 EUR</td>\n"
        "  </tr>\n"
        '  <tr class="last">\n'
        "    <td>1</td><td>&lt;b&gt;Cake&lt;/b&gt;</td><td>1 x 4.00 EUR</td>\n"
        "  </tr>\n"
        "</table>\n"
        "<p>Paid by <i>card</i></p>\n"
    )


def test_html_receipt_without_items_renders_the_else_rows(renderer: Renderer) -> None:
    out = render(renderer, RECEIPT, html=True, user={"name": "Ada"}, data={"items": [], "footer": None})
    assert out == "<h1>Receipt for Ada</h1>\n<table>\n  <tr><td>No items</td></tr>\n</table>\n\n"


def test_sms_with_date_and_number_helpers_called_the_handlebars_way(renderer: Renderer) -> None:
    source = (
        'Hi {{user.name}}, see you on {{dateFormat data.due "DD/MM/YYYY HH:mm" "Europe/Rome"}}'
        "{{#if (dateFormat data.due 'YYYY')}} ({{dateFormat data.due 'YYYY'}}){{/if}}."
        ' Due: {{toLocale data.amount "de-DE"}} EUR, {{toLocale (lookup data "amount")}} in en-US.'
    )
    data = {"due": "2024-03-05T17:30:00Z", "amount": 1234.5}
    assert render(renderer, source, user={"name": "Ada"}, data=data) == (
        "Hi Ada, see you on 05/03/2024 18:30 (2024). Due: 1.234,5 EUR, 1,234.5 in en-US."
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", render(renderer, "{{dateNow}}"))


STANDALONE = (
    "Orders:\r\n"
    "{{! one block per order }}\r\n"
    "{{#each data.orders}}\r\n"
    "  - {{id}}\r\n"
    "    {{#each lines}}\r\n"
    "    * {{this}}\r\n"
    "    {{else}}\r\n"
    "    (empty)\r\n"
    "    {{/each}}\r\n"
    "{{/each}}\r\n"
    "{{!--\r\n  the end\r\n--}}\r\n"
    "Bye {{user.name}}\r\n"
)


def test_lines_holding_only_a_block_tag_or_comment_disappear(renderer: Renderer) -> None:
    data = {"orders": [{"id": "A1", "lines": ["tea", "cake"]}, {"id": "B2", "lines": []}]}
    assert render(renderer, STANDALONE, user={"name": "Ada"}, data=data) == (
        "Orders:\r\n  - A1\r\n    * tea\r\n    * cake\r\n  - B2\r\n    (empty)\r\nBye Ada\r\n"
    )


def test_else_if_chains_on_their_own_lines_and_include_zero(renderer: Renderer) -> None:
    source = (
        "{{#if user.gold}}\n  gold\n{{else if user.tier}}\n  {{user.tier}}\n{{else}}\n  none\n{{/if}}\n"
        "points: {{#if data.points}}{{data.points}}{{else}}none{{/if}}"
        " / {{#if data.points includeZero=true}}{{data.points}}{{/if}}\n"
    )
    assert render(renderer, source, user={"tier": "silver"}, data={"points": 0}) == "  silver\npoints: none / 0\n"


def test_tilde_strips_whitespace_on_every_kind_of_tag(renderer: Renderer) -> None:
    source = (
        "Tags:   {{~#each data.tags~}}\n   [{{this}}]\n   {{~#unless @last}}, {{/unless~}}\n{{~/each~}}   .\n"
        "{{user.name~}}   !   {{~user.name}} {{~! gone ~}}  | {{~{user.name}~}} | {{~& user.name}}\n"
    )
    assert render(renderer, source, user={"name": "Ada"}, data={"tags": ["a", "b", "c"]}) == (
        "Tags:[a], [b], [c].\nAda!Ada|Ada|Ada\n"
    )


def test_comments_render_nothing_even_when_they_contain_mustaches(renderer: Renderer) -> None:
    source = "a{{! short }}b{{!-- long {{user.name}} }} --}}c{{!--}}d"
    assert render(renderer, source, user={"name": "Ada"}) == "abcd"


def test_values_print_as_handlebars_prints_them(renderer: Renderer) -> None:
    user = {
        "nick": None,
        "vip": True,
        "tags": ["a", "b"],
        "address": {"city": "Rome"},
        "score": 2.0,
        "ratio": 0.5,
        "first name": "Ada",
    }
    source = (
        "[{{user.nick}}][{{user.missing.deep}}][{{user.vip}}][{{user.tags}}][{{user.address}}]"
        "[{{user.score}}][{{user.ratio}}][{{user.[first name]}}][{{user.tags.length}}][{{user.tags.[1]}}]"
    )
    assert render(renderer, source, user=user) == "[][][true][a,b][[object Object]][2][0.5][Ada][2][b]"


def test_truthiness_is_handlebars_not_python(renderer: Renderer) -> None:
    # [] is false, {} is true, 0 is false for #if but a context for #with.
    source = (
        "{{#if data.empty}}T{{else}}F{{/if}}{{#if data.obj}}T{{else}}F{{/if}}{{#if data.zero}}T{{else}}F{{/if}}"
        "{{#if data.str}}T{{else}}F{{/if}}{{#with data.zero}}[{{this}}]{{/with}}"
        "{{#with data.empty}}T{{else}}F{{/with}}{{#unless data.obj}}T{{else}}F{{/unless}}"
    )
    assert render(renderer, source, data={"empty": [], "obj": {}, "zero": 0, "str": ""}) == "FTFF[0]FF"


def test_each_over_an_object_walks_its_keys_in_order(renderer: Renderer) -> None:
    source = (
        "{{#each data.totals}}{{#if @first}}({{/if}}{{@index}}:{{@key}}={{this}}{{#if @last}}){{else}}, {{/if}}"
        "{{/each}} {{#each data.totals as |amount label|}}{{label}}{{amount}}{{/each}}"
        " {{#with user as |u|}}{{u.name}}{{/with}}"
    )
    data = {"totals": {"net": 10, "vat": 2, "gross": 12}}
    assert render(renderer, source, user={"name": "Ada"}, data=data) == (
        "(0:net=10, 1:vat=2, 2:gross=12) net10vat2gross12 Ada"
    )


def test_paths_are_relative_to_the_block_context(renderer: Renderer) -> None:
    source = (
        "{{#each data.groups}}{{#each members}}{{name}}/{{../name}}/{{../../user.name}}/{{@root.user.name}}/"
        "{{this.name}}/{{./name}}/{{@../index}}{{@index}}/{{lookup ../../user.tags @index}};{{/each}}{{/each}}"
        " {{user/name}} {{#with data}}{{user.name}}{{/with}}"
    )
    data = {"groups": [{"name": "G1", "members": [{"name": "M1"}, {"name": "M2"}]}]}
    assert render(renderer, source, user={"name": "Ada", "tags": ["x", "y"]}, data=data) == (
        "M1/G1/Ada/Ada/M1/M1/00/x;M2/G1/Ada/Ada/M2/M2/01/y; Ada "
    )


def test_literal_text_is_never_read_as_jinja(renderer: Renderer) -> None:
    source = "{% raw %}{# no #}{%- x -%} 100%}} {{ '{{' }}\\{{user.name}} \\\\{{user.name}} {\r\nend\n"
    assert render(renderer, source, user={"name": "Ada"}) == (
        "{% raw %}{# no #}{%- x -%} 100%}} {{user.name}} \\Ada {\r\nend\n"
    )


def test_generated_names_do_not_collide_with_user_keys(renderer: Renderer) -> None:
    # Top-level names are looked up in the context only: Jinja's globals and our own names are
    # not reachable (in Handlebars they would be missing keys). Block parameters stay visible in
    # nested blocks, whatever they are called.
    source = (
        "{{_hb_u}}{{loop}}{{range}}{{dateNow.x}}{{#each data.rows as |_hb_v1 loop|}}"
        "{{_hb_v1._hb_x1}}{{loop}}{{#each ../data.rows}}{{_hb_v1._hb_x1}}{{_hb_x1}}{{/each}};{{/each}}"
    )
    data = {"rows": [{"_hb_x1": "a"}, {"_hb_x1": "b"}]}
    assert render(renderer, source, data=data) == "a0aaab;b1babb;"


@pytest.mark.parametrize(
    "source",
    [
        "{{user.__class__}}",
        "{{#with user.__class__}}{{__mro__}}{{/with}}",
        "{{lookup user '__class__'}}",
        "{{user.[__class__].[__mro__]}}",
        "{{#each user.__class__.__mro__}}{{this}}{{/each}}",
        "{{#if user.name.__len__}}x{{/if}}",
    ],
)
def test_sandbox_escapes_written_in_handlebars_fail_the_delivery(renderer: Renderer, source: str) -> None:
    with pytest.raises(RenderError, match="unsafe"):
        render(renderer, source, user={"name": "x"})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("Hi\n\n{{#each data.items}}\n{{name}}\n", "line 3: unclosed {{#each}}"),
        ("{{#if a}}\n{{/each}}", "line 2: {{/each}} does not close {{#if}} (line 1)"),
        ("a\n{{else}}", "line 2: {{else}} outside a block"),
        ("a\n{{/if}}", "line 2: {{/if}} closes no open block"),
        ("{{#if a}}{{else}}\n{{else}}{{/if}}", "line 2: a second {{else}} in {{#if}} (line 1)"),
        ("x\n{{#custom user}}y{{/custom}}", "line 2: unknown block helper {{#custom}}"),
        ("x\n\n{{shout user.name}}", "line 3: unknown helper 'shout'"),
        ("{{> header}}", "line 1: {{> header}}: partials"),
        ("{{#> layout}}x{{/layout}}", "line 1: {{#> layout}}: partial blocks"),
        ("{{#* inline 'x'}}y{{/inline}}", "decorators are not supported"),
        ("{{^data.items}}none{{/data.items}}", "use {{#unless name}}"),
        ("{{{{raw}}}} {{x}} {{{{/raw}}}}", "raw blocks"),
        ("{{dateFormat}}", "dateFormat takes 1 to 3 arguments, not 0"),
        ("{{dateFormat data.due format='YYYY'}}", "dateFormat does not take hash arguments (format=)"),
        ("{{#if}}x{{/if}}", "{{#if}} takes exactly one argument"),
        ("a\n{{user.name", "line 2: unclosed {{"),
        ("{{user.na!me}}", "line 1: unexpected 'n'"),
        ("a\n\n{{!-- open", "line 3: unclosed comment"),
        ("{{data.items.0}}", "write [0] for an index"),
    ],
)
def test_syntax_errors_name_the_line(source: str, message: str) -> None:
    with pytest.raises(HandlebarsSyntaxError) as caught:
        to_jinja(source)
    assert message in str(caught.value)
    # Caught wherever Jinja's own compile errors are (Renderer.compile catches TemplateError).
    assert isinstance(caught.value, TemplateSyntaxError)
    assert str(caught.value).startswith(f"line {caught.value.lineno}: ")


def test_nesting_and_paths_are_bounded_before_jinja_sees_them() -> None:
    # Past about 20 nested loops or 200 chained lookups CPython's compiler itself gives up
    # (SyntaxError, RecursionError), which no caller would take for a template error.
    with pytest.raises(HandlebarsSyntaxError, match="nested more than"):
        to_jinja("{{#each a}}" * 17 + "{{/each}}" * 17)
    with pytest.raises(HandlebarsSyntaxError, match="path longer than"):
        to_jinja("{{" + "a." * 100 + "b}}")
    with pytest.raises(HandlebarsSyntaxError, match="subexpressions nested"):
        to_jinja("{{toLocale " + "(toLocale " * 20 + "1" + ")" * 20 + "}}")
