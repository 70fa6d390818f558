"""E-mail address validation: the plain-address shortcut of `channels.valid_email` agrees with the
full RFC 5322 parser on every string it accepts."""

from __future__ import annotations

import string
from email.headerregistry import Address

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.channels import _PLAIN_EMAIL, valid_email

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
# Near the shortcut's language and around it: dots, @, spaces, quotes, brackets, non-ASCII.
NEAR = ATEXT + '.@ "()<>[]:;,\\\u00e9\u2028'


def parsed(value: str) -> tuple[str, str] | None:
    try:
        address = Address(addr_spec=value)
    except Exception:
        return None
    return address.username, address.domain


LOCAL = st.text(ATEXT + "..", min_size=1, max_size=12)
DOMAIN = st.text(string.ascii_lowercase + string.digits + "-..", min_size=1, max_size=12)


@settings(max_examples=3000)
@given(st.text(alphabet=NEAR, max_size=40) | st.builds(lambda a, b: f"{a}@{b}", LOCAL, DOMAIN))
def test_every_string_the_shortcut_accepts_the_parser_accepts_alike(value: str) -> None:
    if _PLAIN_EMAIL.fullmatch(value) is None:
        return
    local, domain = value.rsplit("@", 1)
    assert parsed(value) == (local, domain)
    assert "." in domain


def test_addresses_each_way() -> None:
    for good in ("u1@example.com", "first.last+tag@mail.example.co.uk", "o'brien@x-y.example", "a@localhost"):
        assert valid_email(good), good
    for bad in ("", "plain", "a@b", "@example.com", "a@", "a..b@example.com", ".a@example.com", "a b@example.com"):
        assert not valid_email(bad), bad
    # Through the parser, not the shortcut: a quoted local part.
    assert _PLAIN_EMAIL.fullmatch('"a b"@example.com') is None and valid_email('"a b"@example.com')
