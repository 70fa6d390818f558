"""The predecessor's deployment as it is: its JSON configuration, its variables, `migrate-config`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from dispatcher import ConfigError
from dispatcher.embedded_store import free_port
from dispatcher.predecessor import migrate_config
from dispatcher.settings import load_settings, load_settings_report
from test_cli import clean_env, run_cli, wait_ready

# The documentation's own example (SPEC section 11).
DOC_EXAMPLE = {
    "userFields": {"id": "fiscalCode", "emailAddress": "mail", "clusters": "groups"},
    "activeChannels": ["email", "push"],
    "sender": {"email": "email@test.com"},
    "androidIntentAction": "eu.miaplatform.fakeactivity",
}

# Every documented key, with values that differ from our defaults.
FULL = {
    "userFields": {
        "id": "fiscalCode",
        "emailAddress": "mail",
        "phoneNumber": "mobile",
        "deviceToken": "tokens",
        "clusters": "groups",
    },
    "activeChannels": ["email", "sms", "voice"],
    "sender": {"email": "noreply@x.com", "sms": "+15017122661", "voice": "+390000000"},
    "androidIntentAction": "eu.example.OPEN",
    "flowManagerConfiguration": {
        "metadataSchema": {
            "channels": "notifications.channels",
            "recipients": "notifications.to",
            "clusters": "notifications.groups",
            "messageTitle": "notifications.title",
            "messageContent": "notifications.body",
            "templateId": "notifications.template",
            "emailAttachments": "notifications.files",
            "emailCarbonCopies": "notifications.cc",
            "emailBlindCarbonCopies": "notifications.bcc",
            "emailSender": "notifications.from",
        },
        "serviceUrl": "http://flow-manager-service",
        "successEventLabel": "notificationSent",
        "failEventLabel": "notificationFailed",
        "getTemplateIdFilePath": "/path/getTemplateId.js",
        "getDataFilePath": "/path/getData.js",
    },
}
ENV = {
    "HTTP_PORT": "3100",
    "LOG_LEVEL": "warn",
    "USERS_CRUD_NAME": "citizens",
    "TEMPLATES_CRUD_NAME": "notification_templates",
    "FILE_SERVICE_NAME": "files-service",
    "DEFAULT_LOCALE": "it-IT",
}


def write_json(tmp_path: Path, document: object, name: str = "messaging.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def test_every_documented_key_and_variable_maps_where_it_should(tmp_path: Path) -> None:
    path = write_json(tmp_path, FULL)
    settings, report = load_settings_report(None, {**ENV, "CONFIGURATION_PATH": str(path)})
    fields = settings.user_fields
    assert (fields.id, fields.email_address, fields.phone_number, fields.device_token, fields.clusters) == (
        "fiscalCode",
        "mail",
        "mobile",
        "tokens",
        "groups",
    )
    assert settings.channels.active == ("email", "sms", "voice")
    assert (settings.sender.email, settings.sender.sms, settings.sender.voice) == (
        "noreply@x.com",
        "+15017122661",
        "+390000000",
    )
    assert settings.providers.fcm.android_intent_action == "eu.example.OPEN"
    flow = settings.flow_manager
    assert flow.metadata_schema == FULL["flowManagerConfiguration"]["metadataSchema"]  # type: ignore[index]
    assert (flow.service_url, flow.success_event_label, flow.fail_event_label) == (
        "http://flow-manager-service",
        "notificationSent",
        "notificationFailed",
    )
    assert settings.server.port == 3100
    assert settings.logging.level == "warn"
    assert settings.store.users_collection == "citizens"
    assert settings.store.templates_collection == "notification_templates"
    assert settings.files.url == "http://files-service"
    assert settings.templates.default_locale == "it-IT"
    # Where each value came from: the JSON key, or the variable.
    assert report.sources["user_fields.phone_number"] == f"CONFIGURATION_PATH {path}: userFields.phoneNumber"
    assert report.sources["files.url"] == "FILE_SERVICE_NAME"
    assert report.sources["flow_manager.metadata_schema"].endswith("flowManagerConfiguration.metadataSchema")
    # The JavaScript hooks cannot run here: said, with what replaces them.
    [template_hook] = [n for n in report.notices if "getTemplateIdFilePath" in n]
    assert "[flow_manager].template_ids" in template_hook
    [data_hook] = [n for n in report.notices if "getDataFilePath" in n]
    assert "[flow_manager].data_path" in data_hook


def test_toml_and_our_variables_apply_on_top(tmp_path: Path) -> None:
    path = write_json(tmp_path, DOC_EXAMPLE)
    toml = tmp_path / "config.toml"
    toml.write_text('[user_fields]\nemail_address = "email"\n[server]\nport = 4000\n')
    settings, report = load_settings_report(
        toml,
        {"CONFIGURATION_PATH": str(path), "HTTP_PORT": "3100", "DISPATCHER__SENDER__EMAIL": "ops@example.com"},
    )
    assert settings.user_fields.email_address == "email"  # the TOML file over the JSON
    assert settings.user_fields.id == "fiscalCode"  # the JSON where the TOML is silent
    assert settings.server.port == 4000 and report.sources["server.port"] == str(toml)
    assert settings.sender.email == "ops@example.com"
    assert report.sources["sender.email"] == "DISPATCHER__SENDER__EMAIL"


def test_unknown_keys_and_dead_variables_are_reported_one_line_each(tmp_path: Path) -> None:
    path = write_json(tmp_path, {**DOC_EXAMPLE, "smtpHost": "mail.local", "userFields": {"id": "_id", "nickname": "n"}})
    env = {
        "CONFIGURATION_PATH": str(path),
        "CRUD_SERVICE_NAME": "crud-service",
        "MAIL_SERVICE_NAME": "mail",
        "SMS_SERVICE_NAME": "sms",
        "KAFKA_BROKERS": "kafka:9092",
        "KAFKA_PASSWORD": "kafka-secret",
        "KALEYRA_API_KEY": "kaleyra-secret",
    }
    _, report = load_settings_report(None, env)
    text = "\n".join(report.notices)
    assert "smtpHost" in text and "userFields.nickname" in text
    for name, advice in [
        ("CRUD_SERVICE_NAME", "MONGODB_URL"),
        ("MAIL_SERVICE_NAME", '[channels.email] provider = "smtp"'),
        ("SMS_SERVICE_NAME", '[channels.sms] provider = "twilio"'),
        ("KAFKA_BROKERS", '[channels.push] provider = "fcm"'),
        ("KAFKA_PASSWORD", '[channels.push] provider = "fcm"'),
        ("KALEYRA_API_KEY", '[channels.voice] provider = "twilio"'),
    ]:
        [line] = [n for n in report.notices if n.startswith(name + " ")]
        assert advice in line
    assert "secret" not in text  # values are never shown


@pytest.mark.parametrize(
    "document, fragment",
    [
        ("{not json", "invalid JSON"),
        ([], "must be a JSON object"),
        ({"userFields": {"id": "_id"}}, "activeChannels: required"),
        ({"activeChannels": "email"}, "activeChannels: must be an array"),
        ({"activeChannels": ["email", "fax"]}, "activeChannels"),
        ({"activeChannels": ["email"], "userFields": {"id": 7}}, "userFields.id: must be a string"),
        ({"activeChannels": ["email"], "sender": "me"}, "sender: must be an object"),
        (
            {"activeChannels": ["email"], "flowManagerConfiguration": {"metadataSchema": {"recipients": "a.b"}}},
            "channels: required",
        ),
        (
            {"activeChannels": ["email"], "flowManagerConfiguration": {"metadataSchema": {"channels": 3}}},
            "flowManagerConfiguration.metadataSchema",
        ),
    ],
)
def test_a_malformed_file_stops_start_up_naming_the_key(tmp_path: Path, document: object, fragment: str) -> None:
    path = write_json(tmp_path, document)
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"CONFIGURATION_PATH": str(path)})
    assert fragment in str(caught.value) and str(path) in str(caught.value)


def test_bad_variables_stop_start_up_naming_them(tmp_path: Path) -> None:
    path = write_json(tmp_path, DOC_EXAMPLE)
    with pytest.raises(ConfigError, match="HTTP_PORT"):
        load_settings(None, {"CONFIGURATION_PATH": str(path), "HTTP_PORT": "web"})
    with pytest.raises(ConfigError, match="DEFAULT_LOCALE"):
        load_settings(None, {"CONFIGURATION_PATH": str(path), "DEFAULT_LOCALE": "xx-NOPE"})
    with pytest.raises(ConfigError, match="does-not-exist.json"):
        load_settings(None, {"CONFIGURATION_PATH": str(tmp_path / "does-not-exist.json")})


def test_migrate_config_prints_toml_that_loads_to_the_same_settings(tmp_path: Path) -> None:
    path = write_json(tmp_path, FULL)
    text = migrate_config(path, {"USERS_CRUD_NAME": "citizens"})
    assert "# NOTE:" in text and "getTemplateIdFilePath" in text
    toml = tmp_path / "migrated.toml"
    toml.write_text(text)
    tomllib.loads(text)
    migrated = load_settings(toml, {})
    original = load_settings(None, {"CONFIGURATION_PATH": str(path), "USERS_CRUD_NAME": "citizens"})
    assert migrated == original


def test_the_service_runs_on_the_documented_example_alone(tmp_path: Path) -> None:
    """No TOML, no variable of ours: the documentation's example file and variables, a seeded
    embedded store, one send that reaches the outbox with the mapped fields and sender."""
    path = write_json(tmp_path, DOC_EXAMPLE)
    port = free_port()
    env = clean_env(
        CONFIGURATION_PATH=str(path),
        HTTP_PORT=str(port),
        USERS_CRUD_NAME="users",
        TEMPLATES_CRUD_NAME="message_templates",
        LOG_LEVEL="info",
        KAFKA_BROKERS="kafka:9092",
    )
    seed = tmp_path / "seed.json"
    seed.write_text(
        json.dumps(
            {
                "users": [
                    {"fiscalCode": "RSSMRA80A01H501U", "mail": "mario@example.com", "groups": ["rome"]},
                    {"fiscalCode": "VRDLGU80A01F205X", "mail": "luigi@example.com", "groups": ["milan"]},
                ]
            }
        )
    )
    seeded = run_cli("seed", str(seed), cwd=tmp_path, env=env)
    assert seeded.returncode == 0, seeded.stderr
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "serve"], stdout=log, stderr=log, cwd=tmp_path, env=env
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(process, base, log_path)
        answer = httpx.post(
            f"{base}/send",
            json={
                "channels": ["email"],
                "recipients": ["RSSMRA80A01H501U"],
                "messageTitle": "Hello",
                "messageContent": "Hi {{ user.mail }}",
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["failures"] == [] and answer.json()["summary"]["sent"] == {"email": 1}
        refused = httpx.post(
            f"{base}/send",
            json={"channels": ["sms"], "recipients": ["RSSMRA80A01H501U"], "messageContent": "x"},
            timeout=30,
        )
        assert refused.status_code == 400 and "sms" in refused.json()["message"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    [eml] = list((tmp_path / "var" / "outbox" / "email").glob("*.eml"))
    message = eml.read_text()
    assert "To: mario@example.com" in message and "From: email@test.com" in message
    assert "Hi mario@example.com" in message
    log_text = log_path.read_text()
    assert f"over the Messaging Service's {path}" in log_text
    assert "KAFKA_BROKERS is set but has no meaning here" in log_text


def test_the_image_runs_a_predecessor_deployment_as_it_is(tmp_path: Path) -> None:
    """The image's command and configuration with only CONFIGURATION_PATH added: the JSON's values
    stand (the image's TOML sets nothing that would hide them)."""
    from test_container import container_argv, container_like

    config, env = container_like(tmp_path)
    env["CONFIGURATION_PATH"] = str(write_json(tmp_path, DOC_EXAMPLE))
    argv = container_argv(config)
    # The same options, same order, but the serve-only --workers.
    serve_only = {argv.index("--workers"), argv.index("--workers") + 1} if "--workers" in argv else set()
    check = [arg if arg != "serve" else "check-config" for i, arg in enumerate(argv) if i not in serve_only]
    run = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert printed["user_fields"]["id"] == "fiscalCode" and printed["channels"]["active"] == ["email", "push"]
    assert printed["sender"]["email"] == "email@test.com"
    assert printed["server"]["host"] == "0.0.0.0"


def test_check_config_and_migrate_config_from_the_command_line(tmp_path: Path) -> None:
    path = write_json(tmp_path, FULL)
    env = clean_env(USERS_CRUD_NAME="citizens", KALEYRA_SID="sid")
    checked = run_cli("check-config", "--predecessor-config", str(path), cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["user_fields"]["id"] == "fiscalCode"
    assert f"user_fields.id from {path}: userFields.id" in checked.stderr
    assert "store.users_collection from USERS_CRUD_NAME" in checked.stderr
    assert "KALEYRA_SID is set but has no meaning here" in checked.stderr
    migrated = run_cli("migrate-config", str(path), cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr
    toml = tmp_path / "migrated.toml"
    toml.write_text(migrated.stdout)
    assert load_settings(toml, {}) == load_settings(
        None, {"CONFIGURATION_PATH": str(path), "USERS_CRUD_NAME": "citizens"}
    )
