"""Configuration: TOML, environment overrides, secrets, and errors that name the key."""

from __future__ import annotations

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


@pytest.mark.parametrize("text, fragment", [
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
])
def test_invalid_configuration_names_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert fragment in str(caught.value)


def test_environment_overrides_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[channels.sms]\nrate_per_second = 5\n")
    settings = load_settings(path, environ={
        "DISPATCHER__CHANNELS__SMS__RATE_PER_SECOND": "12.5",
        "DISPATCHER__SERVER__PORT": "8080",
        "DISPATCHER__CHANNELS__ACTIVE": '["email", "sms"]',
        "DISPATCHER__SENDER__EMAIL": "ops@example.com",
    })
    assert settings.channels["sms"].rate_per_second == 12.5
    assert settings.server.port == 8080
    assert settings.channels.active == ("email", "sms")
    assert settings.sender.email == "ops@example.com"


def test_unknown_environment_override_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'server.colour'"):
        load_settings(write(tmp_path, ""), environ={"DISPATCHER__SERVER__COLOUR": "blue"})


def test_secrets_come_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""), environ={
        "MONGODB_URL": "mongodb://db.internal:27017/", "SMTP_PASSWORD": "pw-Zq81",
        "TWILIO_AUTH_TOKEN": "tok-Xy77", "GOOGLE_APPLICATION_CREDENTIALS": "/etc/key.json"})
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
    result = subprocess.run([sys.executable, "-m", "dispatcher", "--config", str(path), "serve"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "channels.voice.max_attempts" in result.stderr
    assert "Traceback" not in result.stderr
