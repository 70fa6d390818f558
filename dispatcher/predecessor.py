"""The predecessor's deployment as it is: its JSON configuration file and its environment.

The Messaging Service read a JSON file named by `CONFIGURATION_PATH` and a handful of variables.
`read_predecessor` turns both into a layer of our own settings (the shape of the TOML file),
which the TOML file, `DISPATCHER__...` variables and the command line then override
(`settings.load_settings`). Rules:

- every documented key maps to one of our keys (`FILE_KEYS`, `ENV_KEYS`);
- a key of the wrong type, invalid JSON, or a missing `activeChannels` (the predecessor required
  it) stops start-up with a message naming the key and the file;
- a key or variable that means nothing here is never ignored silently: it is a start-up notice
  saying what to configure instead (`dead_variables`, and the notices of the layer);
- `migrate_config` prints the same layer as TOML, to leave the JSON file behind.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

PREDECESSOR_ENV = "CONFIGURATION_PATH"

# JSON key path -> our key path. Values are taken as they are (strings, the channel list).
FILE_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("userFields", "id"): ("user_fields", "id"),
    ("userFields", "emailAddress"): ("user_fields", "email_address"),
    ("userFields", "phoneNumber"): ("user_fields", "phone_number"),
    ("userFields", "deviceToken"): ("user_fields", "device_token"),
    ("userFields", "clusters"): ("user_fields", "clusters"),
    ("activeChannels",): ("channels", "active"),
    ("sender", "email"): ("sender", "email"),
    ("sender", "sms"): ("sender", "sms"),
    ("sender", "voice"): ("sender", "voice"),
    ("androidIntentAction",): ("providers", "fcm", "android_intent_action"),
    ("flowManagerConfiguration", "metadataSchema"): ("flow_manager", "metadata_schema"),
    ("flowManagerConfiguration", "serviceUrl"): ("flow_manager", "service_url"),
    ("flowManagerConfiguration", "successEventLabel"): ("flow_manager", "success_event_label"),
    ("flowManagerConfiguration", "failEventLabel"): ("flow_manager", "fail_event_label"),
}
# Sections of the file (objects whose keys are listed above).
_SECTIONS = ("userFields", "sender", "flowManagerConfiguration")

# Keys of the file that this service cannot honour, and what replaces them.
DEAD_FILE_KEYS: dict[tuple[str, ...], str] = {
    ("flowManagerConfiguration", "getTemplateIdFilePath"): (
        "JavaScript hooks cannot run here: map each messageLabel to a template in "
        '[flow_manager].template_ids (e.g. template_ids = {orderShipped = "65a0..."}), or map '
        "templateId in metadataSchema"
    ),
    ("flowManagerConfiguration", "getDataFilePath"): (
        "JavaScript hooks cannot run here: name the command's data with a dot path in "
        '[flow_manager].data_path (e.g. data_path = "value.messagePayload"); without it the whole '
        "command is the template data, as in the predecessor without getDataFilePath"
    ),
}

# Variables that still mean something: variable -> our key.
ENV_KEYS: dict[str, tuple[str, ...]] = {
    "HTTP_PORT": ("server", "port"),
    "LOG_LEVEL": ("logging", "level"),
    "USERS_CRUD_NAME": ("store", "users_collection"),
    "TEMPLATES_CRUD_NAME": ("store", "templates_collection"),
    "FILE_SERVICE_NAME": ("files", "url"),
    "DEFAULT_LOCALE": ("templates", "default_locale"),
}

_EMAIL = '[channels.email] provider = "smtp" with [providers.smtp] (host, port, security, username) and SMTP_PASSWORD'
_SMS = '[channels.sms] provider = "twilio" with [providers.twilio].account_sid and TWILIO_AUTH_TOKEN'
_PUSH = (
    '[channels.push] provider = "fcm" with [providers.fcm].project_id and GOOGLE_APPLICATION_CREDENTIALS '
    "(push goes to Firebase Cloud Messaging directly, not through Kafka)"
)
_VOICE = (
    '[channels.voice] provider = "twilio" with [providers.twilio].account_sid and TWILIO_AUTH_TOKEN '
    "(voice calls go through Twilio, not Kaleyra)"
)
# Variables with no meaning here -> what to configure instead. KAFKA_* and KALEYRA_* by prefix.
DEAD_ENV: dict[str, str] = {
    "CRUD_SERVICE_NAME": (
        "users and templates are read from MongoDB directly: set MONGODB_URL (and USERS_CRUD_NAME / "
        "TEMPLATES_CRUD_NAME for the collections)"
    ),
    "MAIL_SERVICE_NAME": f"e-mail is sent directly: configure {_EMAIL}",
    "SMS_SERVICE_NAME": f"SMS are sent directly: configure {_SMS}",
    "KAFKA_2_FIREBASE_SERVICE_NAME": f"configure {_PUSH}",
}
DEAD_ENV_PREFIXES: dict[str, str] = {
    "KAFKA_": f"configure {_PUSH}",
    "KALEYRA_": f"configure {_VOICE}",
}


@dataclass
class PredecessorLayer:
    """Our settings (TOML shape) from the predecessor's file and variables."""

    path: Path
    raw: dict[str, Any] = field(default_factory=dict)
    # Our key -> where it came from ("CONFIGURATION_PATH /etc/x.json: userFields.id", "HTTP_PORT").
    origins: dict[tuple[str, ...], str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)


def dead_variables(environ: Mapping[str, str]) -> list[str]:
    """One notice per predecessor variable that means nothing here (values never shown: some
    are secrets)."""
    notices = []
    for name in sorted(environ):
        advice = DEAD_ENV.get(name) or next(
            (text for prefix, text in DEAD_ENV_PREFIXES.items() if name.startswith(prefix)), None
        )
        if advice is not None:
            notices.append(f"{name} is set but has no meaning here (the Messaging Service's variable): {advice}")
    return notices


def read_predecessor(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> PredecessorLayer | None:
    """The layer of `path` (else `$CONFIGURATION_PATH`) and the predecessor's variables; None
    when neither names a file. `ConfigError` for a file that is missing, not JSON, or has a key
    of the wrong type."""
    env = os.environ if environ is None else environ
    named = path if path is not None else env.get(PREDECESSOR_ENV)
    if not named:
        return None
    file = Path(named)
    where = f"{PREDECESSOR_ENV} {file}" if path is None else str(file)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the predecessor's configuration: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: invalid JSON: {exc}") from None
    layer = PredecessorLayer(file)
    _read_file(document, where, layer)
    _read_env(env, layer)
    return layer


def _read_file(document: Any, where: str, layer: PredecessorLayer) -> None:
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: the configuration must be a JSON object")
    if "activeChannels" not in document:
        raise ConfigError(f"{where}: activeChannels: required (the list of channels to serve)")
    for key, value in document.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key}: must be an object")
            for sub, sub_value in value.items():
                _take(layer, where, (key, sub), sub_value)
        else:
            _take(layer, where, (key,), value)


def _take(layer: PredecessorLayer, where: str, keys: tuple[str, ...], value: Any) -> None:
    name = ".".join(keys)
    if keys in DEAD_FILE_KEYS:
        layer.notices.append(f"{where}: {name} is not used: {DEAD_FILE_KEYS[keys]}")
        return
    target = FILE_KEYS.get(keys)
    if target is None:
        layer.notices.append(f"{where}: {name} is not a key of the Messaging Service's configuration: ignored")
        return
    if target == ("channels", "active"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {name}: must be an array of channel names")
    elif target == ("flow_manager", "metadata_schema"):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where}: {name}: must be an object of dot paths (strings)")
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: {name}: must be a string")
    _put(layer.raw, target, value)
    layer.origins[target] = f"{where}: {name}"


def _read_env(env: Mapping[str, str], layer: PredecessorLayer) -> None:
    for var, target in ENV_KEYS.items():
        value = env.get(var)
        if value is None or value == "":
            continue
        converted: Any = value
        if var == "HTTP_PORT":
            try:
                converted = int(value)
            except ValueError:
                raise ConfigError(f"{var}: {value!r} is not a port number") from None
        elif var == "FILE_SERVICE_NAME":
            # A host name in the platform (the service's name); a URL is taken as it is.
            converted = value if "://" in value else f"http://{value}"
        _put(layer.raw, target, converted)
        layer.origins[target] = var


def _put(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def migrate_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> str:
    """The TOML equivalent of the predecessor's file (and its variables that are set), with the
    notices as comments: what `dispatcher migrate-config FILE` prints."""
    env = os.environ if environ is None else environ
    layer = read_predecessor(path, env)
    assert layer is not None
    notices = [*dead_variables(env), *layer.notices]
    sources = sorted({origin for origin in layer.origins.values() if not origin.startswith(str(layer.path))})
    header = [f"# Migrated from {layer.path} by `dispatcher migrate-config`."]
    if sources:
        header.append(f"# Includes the variables {', '.join(sources)}.")
    header.extend(f"# NOTE: {notice}" for notice in notices)
    return "\n".join(header) + "\n\n" + _toml(layer.raw)


def _toml(raw: Mapping[str, Any]) -> str:
    """TOML for the layer's shapes: tables of strings, numbers, arrays of strings, and tables of
    names (inline). JSON strings are valid TOML basic strings."""
    lines: list[str] = []

    def value(item: Any) -> str:
        if isinstance(item, Mapping):
            return "{ " + ", ".join(f"{key(k)} = {value(v)}" for k, v in item.items()) + " }"
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return json.dumps(item, ensure_ascii=False)

    def key(name: str) -> str:
        return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)

    def table(name: tuple[str, ...], node: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not _is_section(name, k, v)}
        if scalars:
            lines.extend(["", f"[{'.'.join(name)}]"])
            lines.extend(f"{key(k)} = {value(v)}" for k, v in scalars.items())
        for k, v in node.items():
            if _is_section(name, k, v):
                table((*name, k), v)

    for name, node in raw.items():
        table((name,), node)
    return "\n".join(lines).lstrip("\n") + "\n"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _is_section(parent: tuple[str, ...], name: str, node: Any) -> bool:
    # metadata_schema is a table of names (a value), providers.fcm a section.
    return isinstance(node, Mapping) and (*parent, name) != ("flow_manager", "metadata_schema")


__all__ = ["PREDECESSOR_ENV", "PredecessorLayer", "dead_variables", "migrate_config", "read_predecessor"]
