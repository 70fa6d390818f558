"""The content of each channel's messages, and the request-wide e-mail options.

The actors carry a `Message`'s content without looking inside; the channel that builds it
(`channels.py`) and the provider that sends it agree on these types. `User`, `Message` and
`Delivery` are the actors' own (`actors.messages`), re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.messages import Delivery, Message, Status, User

__all__ = [
    "Attachment",
    "Content",
    "Delivery",
    "EmailContent",
    "EmailOptions",
    "Message",
    "PushContent",
    "Status",
    "TextContent",
    "User",
]


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True, slots=True)
class EmailOptions:
    """Request-wide e-mail settings, shared by every e-mail of one request."""

    sender: str
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True, slots=True)
class EmailContent:
    subject: str
    text: str | None
    html: str | None
    options: EmailOptions


@dataclass(frozen=True, slots=True)
class TextContent:
    """SMS text, or the words a voice call reads aloud."""

    body: str
    sender: str


@dataclass(frozen=True, slots=True)
class PushContent:
    title: str | None
    subtitle: str | None
    body: str | None
    data: dict[str, str] = field(default_factory=dict)
    android: dict[str, Any] | None = None
    apns: dict[str, Any] | None = None


Content = EmailContent | TextContent | PushContent
