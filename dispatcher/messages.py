"""What travels between the actors: users, rendered messages and delivery outcomes.

Plain dataclasses: validation happened at the edge, the pipeline only moves these along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

User = dict[str, Any]  # a user document with its `_id` as a string


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


Content = Union[EmailContent, TextContent, PushContent]


@dataclass(frozen=True, slots=True)
class Message:
    """One rendered message for one user on one channel.

    `addresses` holds one e-mail address or phone number, or every device token of the user:
    the push sender delivers to each and reports the user once.
    """

    channel: str
    user_id: str
    addresses: tuple[str, ...]
    content: Content


Status = Literal["sent", "skipped", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one (user, channel) delivery."""

    user_id: str
    channel: str
    status: Status
    error: str | None = None
    # False for a requested id that matched no user: reported, but not a user reached.
    user_found: bool = True
    attempts: int = 0
    # The provider's id of what it accepted (several, space-separated, for several devices).
    provider_id: str | None = None
    # Read back from the ledger (a resumed job): already recorded, not to be written again.
    recorded: bool = False
    # Its outcome was written by its sender right after the provider call (not to be written again).
    written: bool = False
    # Why a failure failed, for the metrics: transient, permanent, throttled, ambiguous, render,
    # not_found, internal.
    kind: str | None = None
    # An ambiguous attempt resolved by asking the provider: "found" (it had it) or "absent".
    reconciled: str | None = None
