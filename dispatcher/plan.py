"""A validated request, ready to run: which channels, compiled templates, request-wide options.

Everything that can make a request invalid is checked while building the plan, before a single
task starts, so request errors never travel inside an `ExceptionGroup`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import RenderError, RequestError
from .messages import Content, EmailContent, EmailOptions, Message, PushContent, TextContent, User
from .models import SendRequest
from .settings import Settings, UserFields
from .templating import Renderer, parse_push_data

RenderFn = Callable[[dict[str, Any]], str]

# What a template must hold for each channel (SPEC section 1): every group, one field of each.
_REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {
    "email": (("emailTitle",), ("emailMessage", "emailHtmlMessage")),
    "sms": (("smsMessage",),),
    "push": (("pushTitle", "pushMessage", "pushData"),),
    "voice": (("voiceMessage",),),
}


def _check_template(template: dict[str, Any], channel: str) -> None:
    groups = _REQUIRED[channel]
    if not all(any(isinstance(template.get(f), str) and template[f] != "" for f in group) for group in groups):
        needed = " and ".join(" or ".join(group) for group in groups)
        raise RequestError(f"templateId: the template has no {channel} text (needs {needed})")


def template_attachments(template: dict[str, Any] | None) -> list[str]:
    """`emailAttachments` of a template: strings, or objects with at least `file`."""
    names: list[str] = []
    for item in (template or {}).get("emailAttachments") or []:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict) and isinstance(item.get("file"), str):
            names.append(item["file"])
        else:
            raise RequestError(f"template emailAttachments: unsupported entry {item!r}")
    return names


@dataclass(frozen=True, slots=True)
class ChannelPlan:
    """Turns one user into this channel's message, or None when the user has no address."""

    channel: str
    address_field: str
    build: Callable[[dict[str, Any]], Content]
    id_of: Callable[[User], str]

    def message_for(self, user: User, data: dict[str, Any]) -> Message | None:
        addresses = addresses_of(user.get(self.address_field))
        if not addresses:
            return None
        content = self.build({"user": user, "data": data})
        return Message(self.channel, self.id_of(user), addresses, content)


def address_field(channel: str, fields: UserFields) -> str:
    """The user field that holds a channel's address(es)."""
    return {"email": fields.email_address, "push": fields.device_token}.get(channel, fields.phone_number)


def addresses_of(value: Any) -> tuple[str, ...]:
    """A user's address field as distinct non-empty strings (one, or several device tokens)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return ()
    # Duplicated tokens would make a device ring twice.
    return tuple(dict.fromkeys(v.strip() for v in value if isinstance(v, str) and v.strip()))


@dataclass(frozen=True, slots=True)
class RequestPlan:
    request: SendRequest
    channels: tuple[ChannelPlan, ...]


def build_plan(request: SendRequest, template: dict[str, Any] | None, settings: Settings, renderer: Renderer,
               email_options: EmailOptions | None, id_of: Callable[[User], str]) -> RequestPlan:
    """Check the request against the template and the configuration, and compile every text."""
    active = settings.channels.active
    for channel in request.channels:
        if channel not in active:
            raise RequestError(f"channels: {channel!r} is not an active channel")
    if template is not None:
        for channel in request.channels:
            _check_template(template, channel)
    texts = _TextSource(request, template, renderer)
    plans = []
    for channel in request.channels:
        if channel == "email":
            assert email_options is not None
            build = _email_builder(texts, email_options)
        elif channel == "push":
            build = _push_builder(texts, settings.providers.fcm.android_intent_action)
        else:
            build = _text_builder(texts, channel, getattr(settings.sender, channel))
        plans.append(ChannelPlan(channel, address_field(channel, settings.user_fields), build, id_of))
    return RequestPlan(request, tuple(plans))


class _TextSource:
    """Compiles a text from the template field, or from the request's own title/content."""

    def __init__(self, request: SendRequest, template: dict[str, Any] | None, renderer: Renderer) -> None:
        self.request = request
        self._template = template
        self._renderer = renderer

    def get(self, template_field: str, request_value: str | None = None, *, html: bool = False) -> RenderFn | None:
        if self._template is not None:
            source = self._template.get(template_field)
            if not isinstance(source, str) or source == "":
                return None
            return self._renderer.compile(source, html=html, field=f"template {template_field}")
        if request_value is None:
            return None
        field = {"emailTitle": "messageTitle", "pushTitle": "messageTitle"}.get(template_field, "messageContent")
        return self._renderer.compile(request_value, field=field)


def _email_builder(texts: _TextSource, options: EmailOptions) -> Callable[[dict[str, Any]], Content]:
    request = texts.request
    subject = texts.get("emailTitle", request.message_title)
    text = texts.get("emailMessage", request.message_content)
    html = texts.get("emailHtmlMessage", None, html=True)
    assert subject is not None

    def build(context: dict[str, Any]) -> Content:
        # Header injection: a subject is one line whatever the template renders.
        title = " ".join(subject(context).splitlines())
        return EmailContent(title, text(context) if text else None, html(context) if html else None, options)

    return build


def _text_builder(texts: _TextSource, channel: str, sender: str) -> Callable[[dict[str, Any]], Content]:
    body = texts.get(f"{channel}Message", texts.request.message_content)
    assert body is not None

    def build(context: dict[str, Any]) -> Content:
        return TextContent(body(context), sender)

    return build


def _push_builder(texts: _TextSource, intent_action: str) -> Callable[[dict[str, Any]], Content]:
    request = texts.request
    title = texts.get("pushTitle", request.message_title)
    subtitle = texts.get("pushSubtitle")
    body = texts.get("pushMessage", request.message_content)
    data = texts.get("pushData")

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
