"""The sections of the settings that the channel table and the providers read: the fields of a
user document and each provider's own settings, on the base every section shares.

They sit below `channels` and `providers`, so that neither imports `settings`, which reads both
tables to check the configuration (`settings.Settings` holds these sections).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class Section(BaseModel):
    """A table of the configuration: a misspelt key is an error, and the values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class UserFields(Section):
    id: str = "_id"
    email_address: str = "emailAddress"
    phone_number: str = "phoneNumber"
    device_token: str = "deviceToken"
    clusters: str = "clusters"


class SmtpSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password: SecretStr = SecretStr("")  # from SMTP_PASSWORD only
    # Idle connections kept open between sends (the e-mail channel's concurrency bounds those in use).
    pool_size: int = Field(8, ge=1)


class TwilioSettings(Section):
    account_sid: str = ""
    auth_token: SecretStr = SecretStr("")  # from TWILIO_AUTH_TOKEN only
    api_base_url: str = "https://api.twilio.com"
    # The service's public URL as Twilio reaches it (scheme, host, port, path prefix): messages and
    # calls are created with StatusCallback = this + /providers/twilio/status, and receipts are
    # verified against it. Empty: no receipts.
    status_callback_base_url: str = ""
    # A receipt for a message the ledger does not hold yet is kept this long, then dropped.
    orphan_receipt_minutes: float = Field(10.0, gt=0)
    # Reconciliation: how long after an ambiguous attempt's claim Twilio's message and call lists
    # are trusted to show it (a message absent from a listing made sooner proves nothing).
    reconcile_settle_seconds: float = Field(30.0, ge=0)
    # Listings in flight at once per channel (they also take the channel's rate tokens).
    reconcile_concurrency: int = Field(4, ge=1)

    @field_validator("status_callback_base_url")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an absolute http(s) URL (the service's public URL), or empty")
        return value.rstrip("/")


class FcmSettings(Section):
    project_id: str = ""
    credentials_file: str = ""  # or GOOGLE_APPLICATION_CREDENTIALS
    api_base_url: str = "https://fcm.googleapis.com"
    android_intent_action: str = ""


class OutboxSettings(Section):
    dir: Path = Path("var/outbox")


class ProvidersSettings(Section):
    smtp: SmtpSettings = SmtpSettings()
    twilio: TwilioSettings = TwilioSettings()
    fcm: FcmSettings = FcmSettings()
    outbox: OutboxSettings = OutboxSettings()


__all__ = [
    "FcmSettings",
    "OutboxSettings",
    "ProvidersSettings",
    "Section",
    "SmtpSettings",
    "TwilioSettings",
    "UserFields",
]
