"""Reading what the outbox provider wrote."""

from __future__ import annotations

import email
import email.policy
import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any


def outbox_records(outbox: Path, channel: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((outbox / channel).glob("*.json"))]


def outbox_mails(outbox: Path) -> list[EmailMessage]:
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for p in sorted((outbox / "email").glob("*.eml"))
    ]
