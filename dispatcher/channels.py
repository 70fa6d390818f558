"""Everything the service knows about a channel, in one table.

A channel is a `ChannelSpec`: where a user keeps its address, what a stored template must hold
for it, whether a request without a template needs a title, how its address is checked, what to do
with an attempt whose outcome is unknown, and how its message is built from the texts of a
request. Adding a channel is one entry here (and a provider that can deliver it, see
`providers/__init__.py`).

This module imports nothing of the service above `messages` and `sections`, so that settings,
models, plan and the actors can all read the table; what a channel reads of the configuration is
`ChannelConfig` (which `settings.Settings` is).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address
from typing import Any, Literal, Protocol

from .errors import RenderError
from .messages import Content, EmailContent, EmailOptions, PushContent, TextContent
from .sections import ProvidersSettings, UserFields

RenderFn = Callable[[dict[str, Any]], str]
BuildFn = Callable[[dict[str, Any]], Content]
Ambiguity = Literal["report", "resend"]


class Senders(Protocol):
    def of(self, channel: str) -> str: ...


class ChannelConfig(Protocol):
    """What a channel reads of the configuration: `settings.Settings` is one."""

    @property
    def user_fields(self) -> UserFields: ...

    @property
    def sender(self) -> Senders: ...

    @property
    def providers(self) -> ProvidersSettings: ...


class TextSource(Protocol):
    """The compiled texts of one request: a template field, or the request's own title/content."""

    request: Any  # SendRequest

    def get(self, template_field: str, request_value: str | None = None, *, html: bool = False) -> RenderFn | None: ...


@dataclass(frozen=True, slots=True)
class BuildContext:
    """Request-wide inputs of a channel's builder besides the texts."""

    settings: ChannelConfig
    email_options: EmailOptions | None = None


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    name: str
    # The user document field holding this channel's address(es), from the configuration.
    address_field: Callable[[ChannelConfig], str]
    # What a stored template must hold: every group, one non-empty field of each.
    template_fields: tuple[tuple[str, ...], ...]
    # Without a template, `messageTitle` is required (it is the subject or title).
    needs_title: bool
    build: Callable[[TextSource, BuildContext], BuildFn]
    valid_address: Callable[[str], bool]
    # Default of `[channels.<name>].on_ambiguous`: a duplicate SMS or call costs money and
    # annoys, a duplicate push costs little.
    on_ambiguous: Ambiguity = "report"
    # Needs the request's e-mail options (sender, Cc/Bcc, attachments) prepared before sending.
    uses_email_options: bool = False


# A plain address (dot-atoms of ASCII letters, digits and the usual punctuation, a dotted domain
# of letters, digits and hyphens): every string it matches, the full parser below accepts with
# the same local part and domain (tests/test_addresses.py checks it), at ~0.5 µs instead of ~38.
# It runs once per e-mail delivery; anything else takes the parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_EMAIL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def valid_email(value: str) -> bool:
    if _PLAIN_EMAIL.fullmatch(value) is not None:
        return True
    try:
        address = Address(addr_spec=value)
    except (HeaderParseError, ValueError, IndexError):
        return False
    domain = address.domain
    return bool(address.username and domain and ("." in domain or domain == "localhost"))


_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def valid_phone(value: str) -> bool:
    """E.164: a plus, a country code, at most 15 digits (what Twilio accepts without guessing)."""
    return _E164.fullmatch(value) is not None


def valid_token(value: str) -> bool:
    # FCM registration tokens are opaque; anything printable without whitespace may be one.
    return value.isprintable() and not any(ch.isspace() for ch in value)


def _build_email(texts: TextSource, ctx: BuildContext) -> BuildFn:
    request = texts.request
    subject = texts.get("emailTitle", request.message_title)
    text = texts.get("emailMessage", request.message_content)
    html = texts.get("emailHtmlMessage", None, html=True)
    options = ctx.email_options
    assert subject is not None and options is not None

    def build(context: dict[str, Any]) -> Content:
        # Header injection: a subject is one line whatever the template renders.
        title = " ".join(subject(context).splitlines())
        return EmailContent(title, text(context) if text else None, html(context) if html else None, options)

    return build


def _text_builder(channel: str) -> Callable[[TextSource, BuildContext], BuildFn]:
    def factory(texts: TextSource, ctx: BuildContext) -> BuildFn:
        body = texts.get(f"{channel}Message", texts.request.message_content)
        sender = ctx.settings.sender.of(channel)
        assert body is not None

        def build(context: dict[str, Any]) -> Content:
            return TextContent(body(context), sender)

        return build

    return factory


def parse_push_data(text: str) -> dict[str, Any]:
    """`pushData` is JSON after interpolation; an object is required."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise RenderError(f"pushData is not valid JSON after interpolation: {exc.msg}") from None
    except RecursionError:
        raise RenderError("pushData is nested too deeply") from None
    if not isinstance(value, dict):
        raise RenderError("pushData must be a JSON object")
    return value


def _build_push(texts: TextSource, ctx: BuildContext) -> BuildFn:
    request = texts.request
    title = texts.get("pushTitle", request.message_title)
    subtitle = texts.get("pushSubtitle")
    body = texts.get("pushMessage", request.message_content)
    data = texts.get("pushData")
    intent_action = ctx.settings.providers.fcm.android_intent_action

    def build(context: dict[str, Any]) -> Content:
        extra = parse_push_data(data(context)) if data else {}
        android = extra.pop("android", None)
        apns = extra.pop("apns", None)
        payload = extra.pop("data", {})
        if not isinstance(payload, dict):
            raise RenderError("pushData.data must be an object")
        payload = {**extra, **payload}
        if intent_action:
            android = dict(android or {})
            notification = dict(android.get("notification") or {})
            notification.setdefault("click_action", intent_action)
            android["notification"] = notification
        return PushContent(
            title=title(context) if title else None,
            subtitle=subtitle(context) if subtitle else None,
            body=body(context) if body else None,
            # FCM data values must be strings.
            data={str(k): v if isinstance(v, str) else json.dumps(v) for k, v in payload.items()},
            android=android if isinstance(android, dict) else None,
            apns=apns if isinstance(apns, dict) else None,
        )

    return build


CHANNELS: dict[str, ChannelSpec] = {}


def register(spec: ChannelSpec) -> ChannelSpec:
    """Add a channel to the table (the built-in ones below; an extension may add its own before
    loading settings)."""
    CHANNELS[spec.name] = spec
    return spec


register(
    ChannelSpec(
        "email",
        lambda s: s.user_fields.email_address,
        (("emailTitle",), ("emailMessage", "emailHtmlMessage")),
        needs_title=True,
        build=_build_email,
        valid_address=valid_email,
        uses_email_options=True,
    )
)
register(
    ChannelSpec(
        "sms",
        lambda s: s.user_fields.phone_number,
        (("smsMessage",),),
        needs_title=False,
        build=_text_builder("sms"),
        valid_address=valid_phone,
    )
)
register(
    ChannelSpec(
        "push",
        lambda s: s.user_fields.device_token,
        (("pushTitle", "pushMessage", "pushData"),),
        needs_title=True,
        build=_build_push,
        valid_address=valid_token,
        on_ambiguous="resend",
    )
)
register(
    ChannelSpec(
        "voice",
        lambda s: s.user_fields.phone_number,
        (("voiceMessage",),),
        needs_title=False,
        build=_text_builder("voice"),
        valid_address=valid_phone,
    )
)


def spec(channel: str) -> ChannelSpec:
    try:
        return CHANNELS[channel]
    except KeyError:
        raise KeyError(f"no channel {channel!r} in the channel table") from None
