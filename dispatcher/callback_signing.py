"""Signatures of callbacks, per the Standard Webhooks specification.

Each POST carries `webhook-id` (the callback's id, the same on every try: receivers drop
duplicates by it), `webhook-timestamp` (Unix seconds of this try) and `webhook-signature`
(`v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>`). Secrets are written
`whsec_<base64>`, as the specification does. The signing is the reference implementation's
(`standardwebhooks`, from the specification's own repository, no dependencies of its own), so
what we sign is what every receiver library verifies.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt

from standardwebhooks.webhooks import Webhook

PREFIX = "whsec_"


def check_secret(secret: str) -> None:
    """Raise `ValueError` unless `secret` is `whsec_` followed by base64 of at least 16 bytes
    (the message never repeats the secret)."""
    if not secret.startswith(PREFIX):
        raise ValueError("must be whsec_<base64> (as the Standard Webhooks specification writes secrets)")
    try:
        raw = base64.b64decode(secret[len(PREFIX) :] + "==", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_<base64>: the part after whsec_ is not base64") from None
    if len(raw) < 16:
        raise ValueError("must be whsec_<base64> of at least 16 random bytes")


def signed_headers(secret: str, message_id: str, body: bytes, at: float) -> dict[str, str]:
    """The three headers of one try of one callback."""
    timestamp = dt.datetime.fromtimestamp(int(at), dt.UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at)),
        "webhook-signature": Webhook(secret).sign(message_id, timestamp, body),
    }


__all__ = ["PREFIX", "check_secret", "signed_headers"]
