"""Configuration: TOML, environment overrides, secrets, and errors that name the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid_and_uses_embedded_defaults() -> None:
    settings = load_settings(Path(__file__).parent.parent / "config.toml", environ={})
    assert settings.store.url.get_secret_value() == ""
    assert {settings.channels[c].provider for c in settings.channels.active} == {"outbox"}
    assert settings.server.port == 3000


def test_missing_default_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.channels.active == ("email", "sms", "push", "voice")
    assert settings.files.max_attachment_bytes == 15728640


def test_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={"DISPATCHER_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[server]\nprot = 3000\n", "unknown key 'server.prot'"),
        ("[sever]\nport = 3000\n", "unknown key 'sever'"),
        ("[server]\nport = 'many'\n", "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[channels.sms]\nconcurrency = 0\n", "channels.sms.concurrency"),
        ("[channels.sms]\nprovider = 'fcm'\n", "channels.sms.provider"),
        ("[channels.email]\nprovider = 'carrier-pigeon'\n", "channels.email.provider"),
        ("[channels]\nactive = ['email', 'fax']\n", "channels.active"),
        ("[providers.smtp]\nsecurity = 'ssl3'\n", "providers.smtp.security"),
        ("[templates]\ndefault_locale = 'xx-NOPE'\n", "templates.default_locale"),
        ("[providers.smtp]\npassword = 'hunter2'\n", "SMTP_PASSWORD"),
        ("[providers.twilio]\nauth_token = 'secret'\n", "TWILIO_AUTH_TOKEN"),
        ("[server\nport = 1\n", "invalid TOML"),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert fragment in str(caught.value)


def test_environment_overrides_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[channels.sms]\nrate_per_second = 5\n")
    settings = load_settings(
        path,
        environ={
            "DISPATCHER__CHANNELS__SMS__RATE_PER_SECOND": "12.5",
            "DISPATCHER__SERVER__PORT": "8080",
            "DISPATCHER__CHANNELS__ACTIVE": '["email", "sms"]',
            "DISPATCHER__SENDER__EMAIL": "ops@example.com",
        },
    )
    assert settings.channels["sms"].rate_per_second == 12.5
    assert settings.server.port == 8080
    assert settings.channels.active == ("email", "sms")
    assert settings.sender.email == "ops@example.com"


def test_unknown_environment_override_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'server.colour'"):
        load_settings(write(tmp_path, ""), environ={"DISPATCHER__SERVER__COLOUR": "blue"})


def test_secrets_come_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, ""),
        environ={
            "MONGODB_URL": "mongodb://db.internal:27017/",
            "SMTP_PASSWORD": "pw-Zq81",
            "TWILIO_AUTH_TOKEN": "tok-Xy77",
            "GOOGLE_APPLICATION_CREDENTIALS": "/etc/key.json",
        },
    )
    assert settings.store.url.get_secret_value() == "mongodb://db.internal:27017/"
    assert settings.providers.smtp.password.get_secret_value() == "pw-Zq81"
    assert settings.providers.twilio.auth_token.get_secret_value() == "tok-Xy77"
    assert settings.providers.fcm.credentials_file == "/etc/key.json"
    dumped = settings.model_dump_json()
    assert "pw-Zq81" not in dumped and "tok-Xy77" not in dumped and "db.internal" not in dumped
    assert "pw-Zq81" not in repr(settings)


def test_secret_cannot_be_set_as_an_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SMTP_PASSWORD"):
        load_settings(write(tmp_path, ""), environ={"DISPATCHER__PROVIDERS__SMTP__PASSWORD": "pw"})


def test_cli_stops_with_a_message_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[channels.voice]\nmax_attempts = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", "--config", str(path), "serve"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "channels.voice.max_attempts" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, ""), environ={"DISPATCHER__SERVER__PROT": "1"})
    assert str(caught.value) == "DISPATCHER__SERVER__PROT: unknown key 'server.prot'"


def test_invalid_value_names_where_it_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 'file-port'\n[channels.sms]\nconcurrency = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"DISPATCHER__SERVER__PORT": "env-port", "DISPATCHER__SEVER__PORT": "1"})
    message = str(caught.value)
    assert "DISPATCHER__SERVER__PORT: server.port:" in message
    assert "DISPATCHER__SEVER__PORT: unknown key 'sever'" in message
    assert f"{path}: channels.sms.concurrency:" in message


@pytest.mark.parametrize(
    "env, fragments",
    [
        (
            {"DISPATCHER__CHANNELS__SMS__PROVIDER": "twilio"},
            [
                "providers.twilio.account_sid: required because channels.sms uses the twilio provider",
                "DISPATCHER__PROVIDERS__TWILIO__ACCOUNT_SID",
                "providers.twilio.auth_token",
                "TWILIO_AUTH_TOKEN",
            ],
        ),
        (
            {"DISPATCHER__CHANNELS__VOICE__PROVIDER": "twilio", "TWILIO_AUTH_TOKEN": "tok"},
            ["providers.twilio.account_sid: required because channels.voice uses the twilio provider"],
        ),
        (
            {"DISPATCHER__CHANNELS__PUSH__PROVIDER": "fcm"},
            [
                "providers.fcm.project_id: required because channels.push uses the fcm provider",
                "DISPATCHER__PROVIDERS__FCM__PROJECT_ID",
                "providers.fcm.credentials_file",
                "GOOGLE_APPLICATION_CREDENTIALS",
            ],
        ),
    ],
)
def test_provider_requirements_are_part_of_validation(
    tmp_path: Path, env: dict[str, str], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, ""), environ=env)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_provider_requirements_met_or_channel_inactive(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "[providers.twilio]\naccount_sid = 'AC1'\n"),
        environ={
            "DISPATCHER__CHANNELS__SMS__PROVIDER": "twilio",
            "TWILIO_AUTH_TOKEN": "tok",
            "DISPATCHER__CHANNELS__PUSH__PROVIDER": "fcm",
            "DISPATCHER__PROVIDERS__FCM__PROJECT_ID": "demo",
            "GOOGLE_APPLICATION_CREDENTIALS": "/etc/key.json",
        },
    )
    assert settings.channels["sms"].provider == "twilio"
    # A channel that is not active creates no provider: nothing is required for it.
    settings = load_settings(
        write(tmp_path, "[channels]\nactive = ['email']\n[channels.sms]\nprovider = 'twilio'\n"), environ={}
    )
    assert settings.channels["sms"].provider == "twilio"


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(
    "provider, key", [("sms=twilio", "providers.twilio.account_sid"), ("push=fcm", "providers.fcm.project_id")]
)
def test_check_config_refuses_what_serve_refuses(tmp_path: Path, command: str, provider: str, key: str) -> None:
    channel, name = provider.split("=")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER") and k != "MONGODB_URL"}
    env[f"DISPATCHER__CHANNELS__{channel.upper()}__PROVIDER"] = name
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher", command], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert result.returncode == 2
    assert f"configuration error: {key}: required" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "var").exists()


@pytest.mark.parametrize(
    "text, variable",
    [
        ('[store]\nurl = "mongodb://app:s3cret@db.internal:27017/"\n', "MONGODB_URL"),
        ('[store]\nurl = "mongodb://app@db.internal:27017/?authMechanism=MONGODB-X509"\n', "MONGODB_URL"),
        ('[cluster]\nredis_url = "redis://:s3cret@redis.internal:6379/0"\n', "REDIS_URL"),
        ('[cluster]\nredis_url = "redis://redis.internal:6379/0?password=s3cret"\n', "REDIS_URL"),
    ],
)
def test_credentials_in_a_url_in_the_file_are_refused(tmp_path: Path, text: str, variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    message = str(caught.value)
    assert "credentials" in message and variable in message and "s3cret" not in message


def test_a_url_without_credentials_may_stay_in_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[store]\nurl = "mongodb://db.internal:27017/"\n[cluster]\nredis_url = "redis://redis.internal:6379/0"\n',
    )
    settings = load_settings(path, environ={})
    assert settings.store.url.get_secret_value() == "mongodb://db.internal:27017/"
    assert settings.cluster.redis_url.get_secret_value() == "redis://redis.internal:6379/0"


def test_command_line_overrides_win_over_file_and_environment(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "[server]\nport = 1\nhost = '10.0.0.1'\n"),
        environ={"DISPATCHER__SERVER__PORT": "2"},
        overrides={"server.port": 3, "server.host": "0.0.0.0"},
    )
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 3)
