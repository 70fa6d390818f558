"""The public request and result shapes of `POST /send` and `Dispatcher.send`.

The wire format is the predecessor's (camelCase); Python code uses snake_case attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .channels import CHANNELS, valid_email as _valid_email
from .errors import RequestError


class SendRequest(BaseModel):
    """One message to many users over several channels."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    channels: tuple[str, ...] = Field(min_length=1)
    recipients: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    template_id: str | None = None
    message_title: str | None = None
    message_content: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    email_attachments: tuple[str, ...] = ()
    email_carbon_copies: tuple[str, ...] = ()
    email_blind_carbon_copies: tuple[str, ...] = ()
    email_sender: str | None = None

    @field_validator("recipients", "clusters", "email_attachments", "email_carbon_copies",
                     "email_blind_carbon_copies", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return () if value is None else value

    @field_validator("data", mode="before")
    @classmethod
    def _null_data(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("channels")
    @classmethod
    def _known_unique_channels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for channel in value:
            if channel not in CHANNELS:
                raise ValueError(f"{channel!r} is not a supported channel")
        duplicates = sorted({c for c in value if value.count(c) > 1})
        if duplicates:
            raise ValueError(f"{duplicates[0]!r} is listed more than once")
        return value

    @field_validator("email_carbon_copies", "email_blind_carbon_copies")
    @classmethod
    def _valid_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            if not _valid_email(address):
                raise ValueError(f"{address!r} is not a valid e-mail address")
        return value

    @field_validator("email_sender")
    @classmethod
    def _valid_sender(cls, value: str | None) -> str | None:
        if value is not None and not _valid_email(value):
            raise ValueError(f"{value!r} is not a valid e-mail address")
        return value

    @field_validator("email_attachments")
    @classmethod
    def _attachment_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not name or name in (".", ".."):
                raise ValueError(f"{name!r} is not a file name")
        return value

    @model_validator(mode="after")
    def _who_and_what(self) -> "SendRequest":
        if not self.recipients and not self.clusters:
            raise ValueError("recipients or clusters: at least one recipient or cluster is required")
        if self.template_id is None:
            if self.message_content is None:
                raise ValueError("messageContent: required when no templateId is given")
            titled = [c for c in self.channels if CHANNELS[c].needs_title]
            if self.message_title is None and titled:
                raise ValueError(f"messageTitle: required for {' and '.join(titled)} when no templateId is given")
        return self

    @classmethod
    def parse(cls, payload: Any) -> "SendRequest":
        """Validate a decoded JSON body; a violation raises `RequestError` naming the field."""
        if not isinstance(payload, dict):
            raise RequestError("the body must be a JSON object")
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise RequestError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"] if not isinstance(part, int)]
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{'.'.join(loc)}: {message}" if loc else message


@dataclass(frozen=True, slots=True)
class Failure:
    user_id: str
    channel: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"userId": self.user_id, "channel": self.channel, "error": self.error}


@dataclass(slots=True)
class Summary:
    users: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"users": self.users, "sent": self.sent, "skipped": self.skipped, "failed": self.failed}


@dataclass(slots=True)
class SendResult:
    failures: list[Failure] = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)

    def to_json(self) -> dict[str, Any]:
        return {"failures": [f.to_json() for f in self.failures], "summary": self.summary.to_json()}
