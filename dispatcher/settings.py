"""Configuration: one TOML file, overridable per key from the environment, parsed once.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key stops start-up with a
message naming it. Secrets never appear in the file: they come from `MONGODB_URL`,
`SMTP_PASSWORD`, `TWILIO_AUTH_TOKEN` and `GOOGLE_APPLICATION_CREDENTIALS`.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Callable
import dataclasses
from pathlib import Path
from typing import Any, Literal
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .channels import CHANNELS as CHANNEL_TABLE
from .errors import ConfigError
from .providers import PROVIDERS
from .sections import ProvidersSettings, Section, UserFields

ENV_PREFIX = "DISPATCHER__"
DEFAULT_CONFIG_PATH = Path("config.toml")


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    # A synchronous POST /send waits at most this long for its result, then answers 202 with the
    # job's id and state (the job goes on; GET /send/{id} follows it).
    sync_timeout_seconds: float = Field(30.0, gt=0)


class DispatcherSettings(Section):
    # How long a shutdown waits for sends in flight before cancelling them.
    drain_timeout_seconds: float = Field(30.0, ge=0)
    # Buffer of each bounded channel between actors: large enough to keep senders busy,
    # small enough that a million-user fan-out never sits in memory.
    queue_size: int = Field(256, ge=1)
    # Users fetched from the store per round trip.
    store_batch_size: int = Field(500, ge=1)
    # A dry run (`POST /send?dryRun=true`) renders the messages of this many users.
    preview_users: int = Field(3, ge=0, le=100)


class StoreSettings(Section):
    url: SecretStr = SecretStr("")
    database: str = "messaging"
    users_collection: str = "users"
    templates_collection: str = "message_templates"
    data_dir: Path = Path("var")
    # The delivery ledger (durable sends): one job document per send, one per (job, user, channel).
    ledger: bool = True
    jobs_collection: str = "dispatch_jobs"
    deliveries_collection: str = "dispatch_deliveries"
    # The callbacks outbox (callback_outbox.py).
    callbacks_collection: str = "dispatch_callbacks"
    idempotency_ttl_hours: float = Field(24.0, gt=0)
    retention_days: float = Field(30.0, gt=0)
    # A running job's owner renews its lease once a third to a half of it has passed; another
    # instance takes the job over once the lease has expired.
    lease_seconds: float = Field(30.0, gt=0)
    # The CRUD service's `__STATE__` of the users and templates this service uses. A document
    # without `__STATE__` counts as PUBLIC (collections not written by the CRUD service have
    # none). Empty: every document, whatever its state.
    crud_states: tuple[Literal["PUBLIC", "DRAFT", "TRASH", "DELETED"], ...] = ("PUBLIC",)


class LedgerSettings(Section):
    # A delivery still `sent` this long after it was accepted, on a channel whose provider sends
    # receipts, becomes `unconfirmed`.
    receipt_timeout_hours: float = Field(72.0, gt=0)


class SenderSettings(Section):
    """The From of each channel; a channel added to the table may have one too."""

    model_config = ConfigDict(extra="allow", frozen=True)

    email: str = "no-reply@localhost"
    sms: str = ""
    voice: str = ""

    @model_validator(mode="before")
    @classmethod
    def _channels_only(cls, raw: Any) -> Any:
        for key in raw if isinstance(raw, Mapping) else ():
            if key not in CHANNEL_TABLE:
                raise ValueError(f"unknown key {key!r} (senders are per channel: {', '.join(CHANNEL_TABLE)})")
        return raw

    def of(self, channel: str) -> str:
        return str(getattr(self, channel, "") or "")


class ChannelSettings(Section):
    provider: str = "outbox"
    concurrency: int = Field(16, ge=1)
    rate_per_second: float = Field(0.0, ge=0)  # 0 = unlimited
    burst: int = Field(1, ge=1)
    timeout_seconds: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    backoff_initial_seconds: float = Field(0.5, ge=0)
    backoff_max_seconds: float = Field(30.0, ge=0)
    # A provider asking for a longer pause than this (`Retry-After`) fails the delivery at once, as
    # throttled, instead of stalling the channel for every request. In cluster mode also how long a
    # delivery waits for an unreachable limiter before its run stops (the job resumes it).
    max_retry_after_seconds: float = Field(300.0, gt=0)
    # An attempt whose outcome is unknown (the service died during it, or it timed out after the
    # request may have reached the provider): report it as a failure, send again, or ask the
    # provider whether it has the message (Twilio only) and send again only if it provably has
    # not. Empty: the channel's default (reconcile on Twilio; else report for email, sms, voice,
    # resend for push).
    on_ambiguous: Literal["report", "resend", "reconcile"] | None = None


class ChannelsSettings(Section):
    """`active` and one `[channels.<name>]` table per channel of the channel table."""

    active: tuple[str, ...] = Field(default_factory=lambda: tuple(CHANNEL_TABLE))
    per_channel: dict[str, ChannelSettings] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gather_channels(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        raw = dict(raw)
        raw.pop("per_channel", None)  # not a key of the file
        per_channel = {name: raw.pop(name) for name in list(raw) if name in CHANNEL_TABLE}
        for name in CHANNEL_TABLE:
            per_channel.setdefault(name, {})
        raw["per_channel"] = per_channel
        return raw

    @field_validator("active")
    @classmethod
    def _known_active(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name not in CHANNEL_TABLE:
                raise ValueError(f"{name!r} is not a channel (one of {', '.join(CHANNEL_TABLE)})")
        return value

    @model_validator(mode="after")
    def _providers_fit_channels(self) -> ChannelsSettings:
        for name, channel in self.per_channel.items():
            entry = PROVIDERS.get(channel.provider)
            if entry is None or not entry.serves(name):
                allowed = ", ".join(sorted(p for p, e in PROVIDERS.items() if e.serves(name)))
                raise ValueError(
                    f"channels.{name}.provider: {channel.provider!r} cannot deliver {name} (use one of {allowed})"
                )
            if channel.on_ambiguous == "reconcile" and not entry.can_reconcile:
                raise ValueError(
                    f"channels.{name}.on_ambiguous: {channel.provider!r} cannot be asked whether a message "
                    "exists; use report or resend"
                )
        return self

    @model_serializer(mode="wrap")
    def _flatten(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {"active": data["active"], **data["per_channel"]}

    def __getitem__(self, channel: str) -> ChannelSettings:
        return self.per_channel[channel]

    def providers(self) -> dict[str, str]:
        """The provider's name of each active channel."""
        return {channel: self.per_channel[channel].provider for channel in self.active}

    def on_ambiguous(self, channel: str) -> str:
        settings = self.per_channel[channel]
        if settings.on_ambiguous:
            return settings.on_ambiguous
        return "reconcile" if PROVIDERS[settings.provider].can_reconcile else CHANNEL_TABLE[channel].on_ambiguous


class FilesSettings(Section):
    url: str = ""
    max_attachment_bytes: int = Field(15 * 1024 * 1024, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)


class TemplateSettings(Section):
    default_locale: str = "en-US"
    max_template_chars: int = Field(64 * 1024, gt=0)
    max_rendered_chars: int = Field(256 * 1024, gt=0)
    # CPU/time budget of one rendering (every text of one message for one user).
    max_render_ms: float = Field(50.0, gt=0)
    # Memory a render worker process may map beyond what it has when it starts (RLIMIT_AS).
    max_render_memory_mb: int = Field(256, gt=0)
    # Syntax of stored templates that do not say (`engine` field of the document). The
    # predecessor's templates are Handlebars; request texts (messageTitle/messageContent) follow
    # `request_engine`.
    default_engine: Literal["handlebars", "jinja"] = "handlebars"
    request_engine: Literal["handlebars", "jinja"] = "handlebars"

    @field_validator("default_locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        from babel import Locale, UnknownLocaleError

        try:
            Locale.parse(value.replace("-", "_"))
        except (ValueError, UnknownLocaleError) as exc:
            raise ValueError(f"unknown locale {value!r}") from exc
        return value


class ClusterSettings(Section):
    # Empty: a single process, limits and fan-outs in memory. Set from REDIS_URL.
    redis_url: SecretStr = SecretStr("")
    namespace: str = Field("dispatcher", min_length=1)


class LoggingSettings(Section):
    # "pino": the platform's JSON log shape (numeric level, time in ms, msg, reqId).
    format: Literal["text", "json", "pino"] = "text"
    # Empty: the command line's --log-level (INFO). Python's names or pino's (trace ... fatal).
    level: str = ""

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        from .logs import python_level

        if value and python_level(value) is None:
            raise ValueError(f"{value!r} is not a log level (debug, info, warning, error, critical, or pino's names)")
        return value


# Fields of a send that a Flow Manager command may fill (`[flow_manager].metadata_schema`).
SAGA_FIELDS = (
    "channels",
    "recipients",
    "clusters",
    "messageTitle",
    "messageContent",
    "templateId",
    "emailAttachments",
    "emailCarbonCopies",
    "emailBlindCarbonCopies",
    "emailSender",
)


class FlowManagerSettings(Section):
    """`POST /saga/send`: the predecessor's `flowManagerConfiguration`, plus declarative
    replacements of its JavaScript hooks (`getTemplateId`, `getData`)."""

    # Send field -> dot path in the command (from its root, else under value.messagePayload).
    metadata_schema: dict[str, str] = Field(default_factory=dict)
    service_url: str = ""
    success_event_label: str = ""
    fail_event_label: str = ""
    # The Flow Manager's REST route for events (POST {service_url}{event_path}).
    event_path: str = "/event"
    # messageLabel -> templateId, for commands whose mapped fields name no template.
    template_ids: dict[str, str] = Field(default_factory=dict)
    # Dot path of the template `data` in the command; empty: the whole command.
    data_path: str = ""
    # Events are retried with capped exponential backoff, then given up (logged).
    event_max_attempts: int = Field(8, ge=1)
    event_timeout_seconds: float = Field(10.0, gt=0)
    event_backoff_seconds: float = Field(1.0, gt=0)
    event_backoff_max_seconds: float = Field(300.0, gt=0)
    # Events waiting for their job or for a retry (one document per saga id and label).
    events_collection: str = "dispatch_saga_events"

    @field_validator("metadata_schema")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if name not in SAGA_FIELDS:
                raise ValueError(f"{name!r} is not a field of a send (one of {', '.join(SAGA_FIELDS)})")
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"{name}: {path!r} is not a dot path")
        if value and "channels" not in value:
            raise ValueError("channels: required (the dot path of the command's channels)")
        return value

    @field_validator("event_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value

    @property
    def sends_events(self) -> bool:
        """Events go out only with the URL and both labels, as in the predecessor."""
        return bool(self.service_url and self.success_event_label and self.fail_event_label)


class AuthSettings(Section):
    # A file of API key hashes (one per line); keys may also come from DISPATCHER_API_KEYS.
    keys_file: str = ""
    keys: SecretStr = SecretStr("")  # from DISPATCHER_API_KEYS only
    # Require a key on /-/metrics too (health routes stay open).
    protect_metrics: bool = False


class CallbackSettings(Section):
    """Signed status callbacks to clients (callback_delivery.py, callback_outbox.py)."""

    # Applies to requests that name no callbackUrl; empty: no callbacks for them.
    default_url: str = ""
    # `delivery.updated` events of one job per POST: at most this many, after at most batch_ms.
    batch_size: int = Field(100, ge=1, le=10_000)
    batch_ms: float = Field(1000.0, ge=0)
    # A callback not delivered after this long (retries included) becomes a dead letter.
    max_age_hours: float = Field(24.0, gt=0)
    # Plain http callback URLs, and URLs resolving to loopback/link-local/private/metadata
    # addresses: refused unless allowed (tests and local runs).
    allow_http: bool = False
    allow_private: bool = False
    timeout_seconds: float = Field(10.0, gt=0)
    # POSTs in flight per destination host, and in all.
    per_host_concurrency: int = Field(4, ge=1)
    concurrency: int = Field(64, ge=1)
    # Backoff between tries: base * 2^(try-1), with full jitter, capped; a 429's Retry-After is
    # honoured up to max_retry_after_seconds.
    backoff_base_seconds: float = Field(1.0, gt=0)
    max_backoff_seconds: float = Field(3600.0, gt=0)
    max_retry_after_seconds: float = Field(3600.0, gt=0)
    # How often each process looks for callbacks to send when none woke it.
    poll_seconds: float = Field(1.0, gt=0)
    # The deployment's signing secret (`whsec_<base64>`), from DISPATCHER_CALLBACK_SECRET only; a
    # key's own secret (keys file, callback_secret_env=) wins.
    secret: SecretStr = SecretStr("")

    @field_validator("default_url")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        if value and not value.lower().startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: SecretStr) -> SecretStr:
        from .callback_signing import check_secret

        if value.get_secret_value():
            check_secret(value.get_secret_value())
        return value


class UiSettings(Section):
    # The operations page (dispatcher/ui): read-only views plus cancel/retry through the API.
    enabled: bool = True
    # Where it is served; every link inside it is relative, so a path-prefix proxy in front works.
    prefix: str = "/-/ui"
    # How often an open page asks for the progress of the running jobs it shows.
    poll_seconds: float = Field(2.0, ge=0.5, le=300)
    # Jobs per page of the list (at most the listing's 200).
    page_size: int = Field(50, ge=1, le=200)

    @field_validator("prefix")
    @classmethod
    def _prefix_is_a_path(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value) or value == "/send" or value.startswith("/send/"):
            raise ValueError("a path like /-/ui: segments of A-Z a-z 0-9 . _ ~ -, no trailing slash, not under /send")
        return value


class Settings(Section):
    server: ServerSettings = ServerSettings()
    dispatcher: DispatcherSettings = DispatcherSettings()
    store: StoreSettings = StoreSettings()
    ledger: LedgerSettings = LedgerSettings()
    user_fields: UserFields = UserFields()
    sender: SenderSettings = SenderSettings()
    channels: ChannelsSettings = Field(default_factory=ChannelsSettings)
    providers: ProvidersSettings = ProvidersSettings()
    files: FilesSettings = FilesSettings()
    templates: TemplateSettings = TemplateSettings()
    cluster: ClusterSettings = ClusterSettings()
    logging: LoggingSettings = LoggingSettings()
    auth: AuthSettings = AuthSettings()
    ui: UiSettings = UiSettings()
    flow_manager: FlowManagerSettings = FlowManagerSettings()
    callbacks: CallbackSettings = CallbackSettings()

    @model_validator(mode="after")
    def _providers_have_what_they_need(self) -> Settings:
        _check_provider_requirements(self)
        return self


# Keys that hold secrets may only be set from these variables, never from the file.
_SECRET_ENV: dict[tuple[str, ...], str] = {
    ("store", "url"): "MONGODB_URL",
    ("providers", "smtp", "password"): "SMTP_PASSWORD",
    ("providers", "twilio", "auth_token"): "TWILIO_AUTH_TOKEN",
    ("cluster", "redis_url"): "REDIS_URL",
    ("auth", "keys"): "DISPATCHER_API_KEYS",
    ("callbacks", "secret"): "DISPATCHER_CALLBACK_SECRET",
}
# Of those, the URLs may name their server in the file; their credentials (user:password@, or a
# `password` query parameter) may not.
_URL_SECRETS = frozenset({("store", "url"), ("cluster", "redis_url")})

# What a provider needs once an active channel uses it: the key under [providers.<name>], and the
# variable that can set it (a secret's only source).
_PROVIDER_REQUIREMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "twilio": (("account_sid", "DISPATCHER__PROVIDERS__TWILIO__ACCOUNT_SID"), ("auth_token", "TWILIO_AUTH_TOKEN")),
    "fcm": (
        ("project_id", "DISPATCHER__PROVIDERS__FCM__PROJECT_ID"),
        ("credentials_file", "GOOGLE_APPLICATION_CREDENTIALS"),
    ),
}


def find_config_file(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The file `load_settings` reads: `path`, else `$DISPATCHER_CONFIG`, else `./config.toml`.

    None when the default file is absent (the defaults apply); a named file that does not exist
    is a `ConfigError`.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None or "DISPATCHER_CONFIG" in env
    config_path = Path(path if path is not None else env.get("DISPATCHER_CONFIG", DEFAULT_CONFIG_PATH))
    if config_path.exists():
        return config_path
    if explicit:
        raise ConfigError(f"configuration file {config_path} does not exist")
    return None


@dataclasses.dataclass
class ConfigReport:
    """What `load_settings_report` learnt besides the settings: where each key set outside the
    defaults came from (dotted key -> file or variable), and notices for start-up (keys and
    variables of the predecessor that mean nothing here, and what to configure instead)."""

    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    notices: list[str] = dataclasses.field(default_factory=list)
    predecessor: Path | None = None
    toml: Path | None = None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    predecessor: str | os.PathLike[str] | None = None,
) -> Settings:
    """Read the TOML file, apply environment overrides and secrets, validate once.

    `path` defaults to `DISPATCHER_CONFIG`, then `./config.toml`; the default file may be absent
    (the embedded defaults apply), a named one may not. `overrides` (dotted keys, e.g.
    `{"server.port": 8080}`, from the command line) win over the file and the environment.
    Under all of them lies the predecessor's JSON configuration and environment, when
    `predecessor` or `CONFIGURATION_PATH` names one (`predecessor.py`).
    An error names the key and where it came from: the file, or the environment variable.
    """
    return load_settings_report(path, environ, overrides=overrides, predecessor=predecessor)[0]


def load_settings_report(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    predecessor: str | os.PathLike[str] | None = None,
) -> tuple[Settings, ConfigReport]:
    """`load_settings`, with the `ConfigReport` of where each value came from."""
    from .predecessor import dead_variables, read_predecessor

    env = os.environ if environ is None else environ
    layer = read_predecessor(predecessor, env)
    # With the predecessor's file, a TOML file applies only when named (--config,
    # DISPATCHER_CONFIG): an example ./config.toml that spells out every default would
    # otherwise override the whole JSON file.
    implicit = path is None and "DISPATCHER_CONFIG" not in env
    config_path = None if layer is not None and implicit else find_config_file(path, env)
    source = str(config_path) if config_path is not None else "configuration"
    raw: dict[str, Any] = {}
    if config_path is not None:
        try:
            raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: invalid TOML: {exc}") from exc
    _refuse_file_secrets(raw, source)
    from_file = copy.deepcopy(raw)
    report = ConfigReport(notices=dead_variables(env), toml=config_path)
    base_origins: dict[tuple[str, ...], str] = {}
    if layer is not None:
        raw = _merged(layer.raw, raw)
        base_origins = layer.origins
        report.notices.extend(layer.notices)
        report.predecessor = layer.path
    # Where each key set outside the file came from, so that an error names the variable.
    origins = _apply_env_overrides(raw, env)
    for keys, var in _SECRET_ENV.items():
        if env.get(var):
            _put(raw, keys, env[var])
            origins[keys] = var
    if env.get("GOOGLE_APPLICATION_CREDENTIALS") and not _dig(raw, ("providers", "fcm", "credentials_file")):
        _put(raw, ("providers", "fcm", "credentials_file"), env["GOOGLE_APPLICATION_CREDENTIALS"])
        origins[("providers", "fcm", "credentials_file")] = "GOOGLE_APPLICATION_CREDENTIALS"
    for dotted, value in (overrides or {}).items():
        keys = tuple(dotted.split("."))
        _put(raw, keys, value)
        origins[keys] = "command line"

    def origin_of(loc: tuple[str, ...]) -> str:
        # The longest key set outside the file that holds `loc` (a variable may set a whole table).
        holders = [keys for keys in origins if loc[: len(keys)] == keys]
        if holders:
            return origins[max(holders, key=len)]
        if _dig(from_file, loc) is not None:
            return source
        # Then the predecessor's file and variables, under the TOML file.
        holders = [keys for keys in base_origins if loc[: len(keys)] == keys]
        if holders:
            return base_origins[max(holders, key=len)]
        # An unknown key or section only a variable introduced (DISPATCHER__SEVER__PORT).
        for keys, var in origins.items():
            if keys[: len(loc)] == loc:
                return var
        return source

    settings = _validate(raw, origin_of)
    for keys in _leaves(raw):
        report.sources[".".join(keys)] = origin_of(keys)
    return settings, report


def _merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, table by table."""
    result = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = _merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _leaves(raw: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for key, value in raw.items():
        # A table of names (metadata_schema, template_ids) is one value, not a section.
        if isinstance(value, Mapping) and value and (*prefix, key) not in _VALUE_TABLES:
            found.extend(_leaves(value, (*prefix, key)))
        else:
            found.append((*prefix, key))
    return found


# Keys whose value is a whole table (not a section of keys).
_VALUE_TABLES = frozenset({("flow_manager", "metadata_schema"), ("flow_manager", "template_ids")})


def settings_from_dict(raw: Mapping[str, Any], source: str = "settings") -> Settings:
    """Validate a plain mapping (as parsed from TOML) into `Settings`; errors name the key."""
    return _validate(raw, lambda loc: source)


def _validate(raw: Mapping[str, Any], origin_of: Callable[[tuple[str, ...]], str]) -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(err, origin_of) for err in exc.errors())) from None


def _describe(err: Mapping[str, Any], origin_of: Callable[[tuple[str, ...]], str]) -> str:
    loc = tuple(str(part) for part in err["loc"] if part != "per_channel")
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        text = f"unknown key {key!r}"
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
        text = f"{key}: {message}" if key else message
    # An error of the whole configuration (a provider's required keys) names its keys and
    # variables itself.
    return f"{origin_of(loc)}: {text}" if loc else text


def _refuse_file_secrets(raw: Mapping[str, Any], source: str) -> None:
    for keys, var in _SECRET_ENV.items():
        value = _dig(raw, keys)
        if value is None:
            continue
        key = ".".join(keys)
        if keys not in _URL_SECRETS:
            raise ConfigError(f"{source}: {key}: secrets are read from the environment ({var}), not from the file")
        if isinstance(value, str) and _has_credentials(value):
            raise ConfigError(
                f"{source}: {key}: credentials do not belong in the file; set {var} to the whole "
                f"URL instead (a URL without user:password@ may stay in the file)"
            )


def _has_credentials(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed URL: validation or the client reports it; look for userinfo anyway
        return "@" in url
    return "@" in parts.netloc or any(name.lower() == "password" for name, _ in parse_qsl(parts.query))


def _check_provider_requirements(settings: Settings) -> None:
    """What a provider needs, checked when a channel uses it, so that `check-config` refuses what
    `serve` would (the providers' constructors check again, harmlessly)."""
    users: dict[str, list[str]] = {}
    for channel in settings.channels.active:
        users.setdefault(settings.channels[channel].provider, []).append(channel)
    problems = []
    for provider, channels in users.items():
        section = getattr(settings.providers, provider, None)
        for field, var in _PROVIDER_REQUIREMENTS.get(provider, ()):
            value = getattr(section, field)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
                where = f"set {var}"
            else:
                where = f"set it in [providers.{provider}] or {var}"
            if not value:
                used_by = ", ".join(f"channels.{name}" for name in channels)
                problems.append(
                    f"providers.{provider}.{field}: required because {used_by} "
                    f"{'uses' if len(channels) == 1 else 'use'} the {provider} provider ({where})"
                )
    if problems:
        raise ValueError("; ".join(problems))


def _apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Put every `DISPATCHER__SECTION__KEY` into `raw`; return which variable set which key."""
    origins: dict[tuple[str, ...], str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if any(not part for part in keys):
            raise ConfigError(f"{name}: malformed override (expected DISPATCHER__SECTION__KEY)")
        if keys in _SECRET_ENV:
            raise ConfigError(f"{name}: {'.'.join(keys)} is a secret; set {_SECRET_ENV[keys]} instead")
        _put(raw, keys, _parse_env_value(value), origin=name)
        origins[keys] = name
    return origins


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


def _put(raw: dict[str, Any], keys: tuple[str, ...], value: Any, origin: str | None = None) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = f"{origin}: " if origin else ""
            raise ConfigError(f"{where}{'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value
