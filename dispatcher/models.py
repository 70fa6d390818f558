"""The public request and result shapes of `POST /send` and `Dispatcher.send`.

The wire format is the predecessor's (camelCase); Python code uses snake_case attributes.
"""

from __future__ import annotations

import math
import re
import reprlib
import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from actors.messages import Failure, SendResult, Summary

from .channels import CHANNELS, valid_email as _valid_email
from .errors import RequestError

# How deeply the values of a request may nest (`data` is the only field where nesting makes
# sense). Deeper structures are rejected up front instead of failing later in whatever recurses
# over them (the JSON parser, a template, a provider's JSON encoder).
MAX_DEPTH = 32
# An idempotency key (the `Idempotency-Key` header or the `idempotencyKey` field): 1 to 256
# characters, no control character (NUL included: it separates the key's scope in the ledger),
# not only whitespace (which an HTTP header cannot even carry).
IDEMPOTENCY_KEY_MAX = 256
IDEMPOTENCY_KEY_PATTERN = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def check_idempotency_key(key: str, name: str) -> str:
    """`key` when it is a valid idempotency key, else `RequestError` naming `name`."""
    if not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
        raise RequestError(f"{name}: must be 1 to {IDEMPOTENCY_KEY_MAX} characters")
    if not _IDEMPOTENCY_KEY.match(key):
        raise RequestError(f"{name}: must not be blank or hold control characters")
    return key


CALLBACK_EVENTS = ("job.finished", "delivery.updated")
_SURROGATE = re.compile("[\ud800-\udfff]")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Characters that break a header line or a file name, or hide what it says: controls (CR, LF,
# NUL, ...), format characters (bidi overrides), line and paragraph separators.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")
_short_repr = reprlib.Repr()  # bounded in depth and width: a deep or huge value costs little to show
_short_repr.maxlevel, _short_repr.maxstring, _short_repr.maxother = 3, 200, 200


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)` for a message that echoes client input, cut to `limit` characters with an
    ellipsis and the original length: a 500 KB id is not sent back whole. Non-printable
    characters (CR, a lone surrogate) come out escaped, as `repr` writes them."""
    if isinstance(value, str):
        # Slice before repr: a 1 MB string is not copied to be thrown away.
        text = repr(value[: limit + 1])
        if len(value) <= limit and len(text) <= limit:
            return text
        return f"{text[:limit]}… ({len(value)} characters)"
    text = _short_repr.repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} items" if isinstance(value, (list, tuple, dict, set)) else "shortened"
    return f"{text[:limit]}… ({size})"


def _unprintable(value: str) -> str | None:
    """The first character of `value` that has no business in an address or a file name."""
    return next((ch for ch in value if unicodedata.category(ch) in _UNPRINTABLE_CATEGORIES), None)


def _path(parts: tuple[str | int, ...]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _PLAIN_KEY.fullmatch(part) else shown(part, 40)
            text = f"{text}.{name}" if text else name
    return text


def _check_plain_json(fields: dict[str, Any]) -> None:
    """Reject what JSON can carry but the service cannot store or send: nesting deeper than
    `MAX_DEPTH`, strings (values or keys) with an unpaired UTF-16 surrogate, which no encoder
    (UTF-8, BSON, MIME) accepts, keys with a NUL (BSON), integers outside 64 bits (BSON) and
    numbers too large for a double (`1e999`). Iterative: a deep structure cannot overflow the
    stack here."""
    stack: list[tuple[Any, tuple[str | int, ...], int]] = [(value, (name,), 1) for name, value in fields.items()]
    while stack:
        value, parts, depth = stack.pop()
        if isinstance(value, str):
            if (match := _SURROGATE.search(value)) is not None:
                raise ValueError(f"{_path(parts)}: invalid Unicode text (unpaired surrogate {shown(match.group())})")
        elif isinstance(value, bool):
            pass
        elif isinstance(value, int):
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise ValueError(f"{_path(parts)}: integer out of range (64 bits at most)")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{_path(parts)}: number out of range")
        elif isinstance(value, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise ValueError(f"{parts[0]}: nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(key, str) and _SURROGATE.search(key):
                        raise ValueError(f"{_path(parts)}: key {shown(key, 40)} is not valid Unicode text")
                    if isinstance(key, str) and "\x00" in key:
                        raise ValueError(f"{_path(parts)}: key {shown(key, 40)} contains a NUL character")
                    stack.append((item, (*parts, key), depth + 1))
            else:
                stack.extend((item, (*parts, i), depth + 1) for i, item in enumerate(value))


# Each model's field names and aliases, found once (pydantic's `model_fields` is not free).
_FIELD_NAMES: dict[type, frozenset[str]] = {}


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
    # Also accepted as the `Idempotency-Key` header (the header wins).
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=IDEMPOTENCY_KEY_MAX, pattern=IDEMPOTENCY_KEY_PATTERN
    )
    # Signed status callbacks (callback_delivery.py); the URL is checked against SSRF when the
    # request is accepted, with the deployment's settings.
    callback_url: str | None = Field(None, min_length=1, max_length=2048)
    callback_events: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, values: Any) -> Any:
        if isinstance(values, dict):
            # Only the fields we use: unknown fields are ignored, whatever they hold.
            known = _FIELD_NAMES.get(cls)
            if known is None:
                known = _FIELD_NAMES[cls] = frozenset(
                    name for n, f in cls.model_fields.items() for name in (n, f.alias) if name is not None
                )
            _check_plain_json({k: v for k, v in values.items() if k in known})
        return values

    @field_validator(
        "recipients", "clusters", "email_attachments", "email_carbon_copies", "email_blind_carbon_copies", mode="before"
    )
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
                raise ValueError(f"{shown(channel)} is not a supported channel")
        duplicates = sorted({c for c in value if value.count(c) > 1})
        if duplicates:
            raise ValueError(f"{shown(duplicates[0])} is listed more than once")
        return value

    @field_validator("callback_events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one event (job.finished, delivery.updated)")
        for event in value:
            if event not in CALLBACK_EVENTS:
                raise ValueError(f"{shown(event)} is not an event (job.finished, delivery.updated)")
        if len(set(value)) != len(value):
            raise ValueError("an event is listed more than once")
        return value

    @field_validator("email_carbon_copies", "email_blind_carbon_copies")
    @classmethod
    def _valid_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            _check_address(address)
        return value

    @field_validator("email_sender")
    @classmethod
    def _valid_sender(cls, value: str | None) -> str | None:
        if value is not None:
            _check_address(value)
        return value

    @field_validator("email_attachments")
    @classmethod
    def _attachment_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not name or name in (".", ".."):
                raise ValueError(f"{shown(name)} is not a file name")
            # It becomes a MIME parameter: a CR/LF there fails every e-mail of the request.
            if (char := _unprintable(name)) is not None:
                raise ValueError(f"{shown(name)} contains a control character {shown(char)}")
        return value

    @model_validator(mode="after")
    def _who_and_what(self) -> SendRequest:
        if not self.recipients and not self.clusters:
            raise ValueError("recipients or clusters: at least one recipient or cluster is required")
        if self.template_id is None:
            if self.message_content is None:
                raise ValueError("messageContent: required when no templateId is given")
            if not self.message_content.strip():
                raise ValueError("messageContent: must not be empty")
            titled = [c for c in self.channels if CHANNELS[c].needs_title]
            if self.message_title is None and titled:
                raise ValueError(f"messageTitle: required for {' and '.join(titled)} when no templateId is given")
        return self

    @classmethod
    def parse(cls, payload: Any) -> SendRequest:
        """Validate a decoded JSON body; a violation raises `RequestError` naming the field."""
        if not isinstance(payload, dict):
            raise RequestError("the body must be a JSON object")
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise RequestError(_first_error(exc)) from None


def _check_address(address: str) -> None:
    # `valid_email` accepts a U+2028 LINE SEPARATOR, which a header line must not carry.
    if not _valid_email(address) or _unprintable(address) is not None:
        raise ValueError(f"{shown(address)} is not a valid e-mail address")


_STRING_ARRAYS = frozenset(
    {
        "channels",
        "recipients",
        "clusters",
        "emailAttachments",
        "emailCarbonCopies",
        "emailBlindCarbonCopies",
        "callbackEvents",
    }
)
# pydantic's error types in words for the client; `_FIELD_PHRASES` first.
_FIELD_PHRASES = {
    ("channels", "missing"): "must be a non-empty array",
    ("channels", "too_short"): "must be a non-empty array",
    ("channels", "tuple_type"): "must be a non-empty array",
}
_TYPE_PHRASES = {
    "missing": "is required",
    "string_type": "must be a string",
    "string_unicode": "must be valid Unicode text",
    "tuple_type": "must be an array",
    "list_type": "must be an array",
    "dict_type": "must be an object",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters long",
    "too_long": "must have at most {max_length} items",
}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc, kind = err["loc"], err["type"]
    if kind == "value_error":
        # Our own validators: the message is already written for the client (the model-wide
        # ones name their field themselves).
        message = str(err["msg"]).removeprefix("Value error, ")
        names = [str(part) for part in loc if not isinstance(part, int)]
        return f"{'.'.join(names)}: {message}" if names else message
    name = str(loc[0]) if loc else "body"
    if name in _STRING_ARRAYS and (len(loc) > 1 or kind in ("tuple_type", "list_type")):
        phrase = _FIELD_PHRASES.get((name, kind), "must be an array of strings")
    else:
        phrase = _FIELD_PHRASES.get((name, kind)) or _TYPE_PHRASES.get(kind, "is invalid")
    try:
        phrase = phrase.format(**err.get("ctx", {}))
    except (KeyError, IndexError, ValueError):
        phrase = "is invalid"
    return f"{name}: {phrase}"


__all__ = ["Failure", "SendRequest", "SendResult", "Summary", "shown"]
