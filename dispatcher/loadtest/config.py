"""The configuration of the service under test: generated from the options and the running
fakes (never from the service's own `config.toml`, unless given as a base), with its secrets
passed the way the service reads them, from the environment."""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..children import python_environment
from ..errors import ConfigError
from ..settings import Settings, settings_from_dict
from .environment import DATABASE, USERS_COLLECTION, Environment
from .options import LoadTestOptions

SENDER_EMAIL = "loadtest@example.com"
SENDER_PHONE = "+15550000000"
# Harness runs stop quickly when aborted; a base configuration may say otherwise.
DRAIN_TIMEOUT_SECONDS = 5.0
_PROVIDER_OF = {"email": "smtp", "sms": "twilio", "voice": "twilio", "push": "fcm"}


def _base_sections(path: Path | None) -> dict[str, Any]:
    """The parts of an operator's configuration a load test keeps: `[dispatcher]`, `[channels.*]`
    (but not their providers), `[templates]` and `[providers.smtp].pool_size`."""
    if path is None:
        return {}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--base-config {path}: {exc}") from None
    kept: dict[str, Any] = {key: raw[key] for key in ("dispatcher", "templates") if isinstance(raw.get(key), dict)}
    channels: dict[str, Any] = raw["channels"] if isinstance(raw.get("channels"), dict) else {}
    kept["channels"] = {
        name: {k: v for k, v in section.items() if k != "provider"}
        for name, section in channels.items()
        if isinstance(section, dict)
    }
    pool_size = raw.get("providers", {}).get("smtp", {}).get("pool_size")
    if pool_size is not None:
        kept["smtp_pool_size"] = pool_size
    return kept


def service_config(options: LoadTestOptions, env: Environment, port: int) -> dict[str, Any]:
    """The service's configuration, without secrets (those go in `secret_environment`)."""
    base = _base_sections(options.base_config)
    fakes = env.fakes
    dispatcher_section: dict[str, Any] = {"drain_timeout_seconds": DRAIN_TIMEOUT_SECONDS, **base.get("dispatcher", {})}
    if options.queue_size is not None:
        dispatcher_section["queue_size"] = options.queue_size
    if options.store_batch_size is not None:
        dispatcher_section["store_batch_size"] = options.store_batch_size
    channels: dict[str, Any] = {"active": list(options.channels)}
    for channel in options.channels:
        section = dict(base["channels"].get(channel, {})) if "channels" in base else {}
        section["provider"] = _PROVIDER_OF[channel]
        for key, mapping in (
            ("concurrency", options.concurrency),
            ("rate_per_second", options.rate),
            ("burst", options.burst),
        ):
            if channel in mapping:
                section[key] = mapping[channel]
        for key, value in (
            ("timeout_seconds", options.timeout),
            ("max_attempts", options.max_attempts),
            ("backoff_initial_seconds", options.backoff),
        ):
            if value is not None:
                section[key] = value
        channels[channel] = section
    providers: dict[str, Any] = {}
    if fakes.smtp_port is not None:
        smtp: dict[str, Any] = {"host": fakes.smtp_host, "port": fakes.smtp_port, "security": "none"}
        pool_size = options.smtp_pool_size if options.smtp_pool_size is not None else base.get("smtp_pool_size")
        if pool_size is not None:
            smtp["pool_size"] = pool_size
        providers["smtp"] = smtp
    if fakes.twilio_url:
        # The fake lists a message as soon as it created it: no settling wait to speak of.
        providers["twilio"] = {
            "account_sid": fakes.twilio_sid,
            "api_base_url": fakes.twilio_url,
            "reconcile_settle_seconds": 1.0,
        }
        if options.receipts_delay is not None and port:
            providers["twilio"]["status_callback_base_url"] = f"http://127.0.0.1:{port}"
    if fakes.fcm_url:
        providers["fcm"] = {"project_id": fakes.fcm_project, "api_base_url": fakes.fcm_url}
    store: dict[str, Any] = {"database": DATABASE, "users_collection": USERS_COLLECTION}
    if options.ledger is not None:
        store["ledger"] = options.ledger
    if options.kill_at is not None:
        # The restarted service resumes the job once the killed one's lease has expired.
        store["lease_seconds"] = options.kill_lease_seconds
    config: dict[str, Any] = {
        # The harness measures a send to its end: a synchronous answer must not turn into a 202
        # after [server].sync_timeout_seconds (30 s by default) while a long fan-out still runs.
        "server": {"host": "127.0.0.1", "port": port, "sync_timeout_seconds": options.request_timeout},
        "dispatcher": dispatcher_section,
        "store": store,
        "sender": {"email": SENDER_EMAIL, "sms": SENDER_PHONE, "voice": SENDER_PHONE},
        "channels": channels,
        "providers": providers,
    }
    if "templates" in base:
        config["templates"] = base["templates"]
    return config


def secret_environment(env: Environment) -> dict[str, str]:
    """The service's secrets, as it reads them: from the environment only."""
    secrets = {"MONGODB_URL": env.store_url}
    if env.redis is not None:
        secrets["REDIS_URL"] = env.redis.url
    if env.fakes.twilio_url:
        secrets["TWILIO_AUTH_TOKEN"] = env.fakes.twilio_token
    if env.fakes.key_file is not None:
        secrets["GOOGLE_APPLICATION_CREDENTIALS"] = str(env.fakes.key_file)
    return secrets


def embedded_settings(config: Mapping[str, Any], env: Environment) -> Settings:
    """`config` plus the secrets, validated as the service would."""
    raw = copy.deepcopy(dict(config))
    raw["store"]["url"] = env.store_url
    if env.redis is not None:
        raw.setdefault("cluster", {})["redis_url"] = env.redis.url
    if env.fakes.twilio_url:
        raw["providers"]["twilio"]["auth_token"] = env.fakes.twilio_token
    if env.fakes.key_file is not None:
        raw["providers"]["fcm"]["credentials_file"] = str(env.fakes.key_file)
    return settings_from_dict(raw, source="load-test configuration")


def child_environment(env: Environment) -> dict[str, str]:
    """The environment of a child process: ours minus the service's own variables (the generated
    file must be the whole configuration), plus the secrets, and the package importable."""
    child = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DISPATCHER_")
        and name
        not in ("MONGODB_URL", "REDIS_URL", "SMTP_PASSWORD", "TWILIO_AUTH_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")
    }
    child.update(secret_environment(env))
    return python_environment(child)
