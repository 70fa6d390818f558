"""Configuration: one TOML file, overridable per key from the environment, parsed once.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key stops start-up with a
message naming it. Secrets never appear in the file: they come from `MONGODB_URL`,
`SMTP_PASSWORD`, `TWILIO_AUTH_TOKEN` and `GOOGLE_APPLICATION_CREDENTIALS`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import ConfigError

CHANNELS: tuple[str, ...] = ("email", "sms", "push", "voice")
ENV_PREFIX = "DISPATCHER__"
DEFAULT_CONFIG_PATH = Path("config.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, gt=0)


class DispatcherSettings(_Section):
    # How long a shutdown waits for sends in flight before cancelling them.
    drain_timeout_seconds: float = Field(30.0, ge=0)
    # Buffer of each bounded channel between actors: large enough to keep senders busy,
    # small enough that a million-user fan-out never sits in memory.
    queue_size: int = Field(256, ge=1)
    # Users fetched from the store per round trip.
    store_batch_size: int = Field(500, ge=1)


class StoreSettings(_Section):
    url: SecretStr = SecretStr("")
    database: str = "messaging"
    users_collection: str = "users"
    templates_collection: str = "message_templates"
    data_dir: Path = Path("var")


class UserFields(_Section):
    id: str = "_id"
    email_address: str = "emailAddress"
    phone_number: str = "phoneNumber"
    device_token: str = "deviceToken"
    clusters: str = "clusters"


class SenderSettings(_Section):
    email: str = "no-reply@localhost"
    sms: str = ""
    voice: str = ""


ProviderName = Literal["outbox", "smtp", "twilio", "fcm"]
_PROVIDERS_FOR: dict[str, set[str]] = {
    "email": {"outbox", "smtp"},
    "sms": {"outbox", "twilio"},
    "voice": {"outbox", "twilio"},
    "push": {"outbox", "fcm"},
}


class ChannelSettings(_Section):
    provider: ProviderName = "outbox"
    concurrency: int = Field(16, ge=1)
    rate_per_second: float = Field(0.0, ge=0)  # 0 = unlimited
    burst: int = Field(1, ge=1)
    timeout_seconds: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    backoff_initial_seconds: float = Field(0.5, ge=0)
    backoff_max_seconds: float = Field(30.0, ge=0)


class ChannelsSettings(_Section):
    active: tuple[Literal["email", "sms", "push", "voice"], ...] = CHANNELS  # type: ignore[assignment]
    email: ChannelSettings = ChannelSettings()
    sms: ChannelSettings = ChannelSettings()
    push: ChannelSettings = ChannelSettings()
    voice: ChannelSettings = ChannelSettings()

    @model_validator(mode="after")
    def _providers_fit_channels(self) -> "ChannelsSettings":
        for name in CHANNELS:
            provider = getattr(self, name).provider
            if provider not in _PROVIDERS_FOR[name]:
                allowed = ", ".join(sorted(_PROVIDERS_FOR[name]))
                raise ValueError(f"channels.{name}.provider: {provider!r} cannot deliver {name} (use one of {allowed})")
        return self

    def __getitem__(self, channel: str) -> ChannelSettings:
        return getattr(self, channel)


class SmtpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password: SecretStr = SecretStr("")  # from SMTP_PASSWORD only
    pool_size: int = Field(8, ge=1)  # persistent connections; e-mail throughput is about pool_size / round trip


class TwilioSettings(_Section):
    account_sid: str = ""
    auth_token: SecretStr = SecretStr("")  # from TWILIO_AUTH_TOKEN only
    api_base_url: str = "https://api.twilio.com"


class FcmSettings(_Section):
    project_id: str = ""
    credentials_file: str = ""  # or GOOGLE_APPLICATION_CREDENTIALS
    api_base_url: str = "https://fcm.googleapis.com"
    android_intent_action: str = ""


class OutboxSettings(_Section):
    dir: Path = Path("var/outbox")


class ProvidersSettings(_Section):
    smtp: SmtpSettings = SmtpSettings()
    twilio: TwilioSettings = TwilioSettings()
    fcm: FcmSettings = FcmSettings()
    outbox: OutboxSettings = OutboxSettings()


class FilesSettings(_Section):
    url: str = ""
    max_attachment_bytes: int = Field(15 * 1024 * 1024, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)


class TemplateSettings(_Section):
    default_locale: str = "en-US"
    max_template_chars: int = Field(64 * 1024, gt=0)
    max_rendered_chars: int = Field(256 * 1024, gt=0)

    @field_validator("default_locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        from babel import Locale, UnknownLocaleError

        try:
            Locale.parse(value.replace("-", "_"))
        except (ValueError, UnknownLocaleError) as exc:
            raise ValueError(f"unknown locale {value!r}") from exc
        return value


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    dispatcher: DispatcherSettings = DispatcherSettings()
    store: StoreSettings = StoreSettings()
    user_fields: UserFields = UserFields()
    sender: SenderSettings = SenderSettings()
    channels: ChannelsSettings = ChannelsSettings()
    providers: ProvidersSettings = ProvidersSettings()
    files: FilesSettings = FilesSettings()
    templates: TemplateSettings = TemplateSettings()


# Keys that hold secrets may only be set from these variables, never from the file.
_SECRET_ENV: dict[tuple[str, ...], str] = {
    ("store", "url"): "MONGODB_URL",
    ("providers", "smtp", "password"): "SMTP_PASSWORD",
    ("providers", "twilio", "auth_token"): "TWILIO_AUTH_TOKEN",
}


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file, apply environment overrides and secrets, validate once.

    `path` defaults to `DISPATCHER_CONFIG`, then `./config.toml`; the default file may be absent
    (the embedded defaults apply), a named one may not.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None or "DISPATCHER_CONFIG" in env
    config_path = Path(path if path is not None else env.get("DISPATCHER_CONFIG", DEFAULT_CONFIG_PATH))
    raw: dict[str, Any] = {}
    if config_path.exists():
        try:
            raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: invalid TOML: {exc}") from exc
    elif explicit:
        raise ConfigError(f"configuration file {config_path} does not exist")
    for keys, var in _SECRET_ENV.items():
        if _dig(raw, keys) is not None and keys != ("store", "url"):
            raise ConfigError(f"{'.'.join(keys)}: secrets are read from the environment ({var}), not from the file")
    _apply_env_overrides(raw, env)
    for keys, var in _SECRET_ENV.items():
        if env.get(var):
            _put(raw, keys, env[var])
    if env.get("GOOGLE_APPLICATION_CREDENTIALS") and not _dig(raw, ("providers", "fcm", "credentials_file")):
        _put(raw, ("providers", "fcm", "credentials_file"), env["GOOGLE_APPLICATION_CREDENTIALS"])
    return settings_from_dict(raw, source=str(config_path))


def settings_from_dict(raw: Mapping[str, Any], source: str = "settings") -> Settings:
    """Validate a plain mapping (as parsed from TOML) into `Settings`; errors name the key."""
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{key}: {message}" if key else message


def _apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        if any(not part for part in keys):
            raise ConfigError(f"{name}: malformed override (expected DISPATCHER__SECTION__KEY)")
        if keys in _SECRET_ENV:
            raise ConfigError(f"{name}: {'.'.join(keys)} is a secret; set {_SECRET_ENV[keys]} instead")
        _put(raw, keys, _parse_env_value(value))


def _parse_env_value(value: str) -> Any:
    # Values are TOML literals when they parse as one (numbers, booleans, arrays), strings otherwise.
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _dig(raw: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    node: Any = raw
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _put(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value
