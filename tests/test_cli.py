"""The command line: options, start-up messages and failures, shutdown of a real process, extras."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import dispatcher
from dispatcher import settings_from_dict
from dispatcher.cli import RESPONSE_MARGIN_SECONDS, build_parser, describe_store, main
from dispatcher.embedded_store import free_port
from dispatcher.fakes import Faults, serve_asgi
from dispatcher.fakes.twilio import FakeTwilio

ROOT = Path(__file__).parent.parent
SID = "AC" + "0" * 32
TOKEN = "tok-cli"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the service's own variables, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DISPATCHER") and name not in ("MONGODB_URL", "REDIS_URL")
    }
    return {**env, **extra}


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env if env is not None else clean_env(),
        timeout=timeout,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (the embedded store names its data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


# --- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--config", "a.toml", "--log-level", "debug"],
        ["--config", "a.toml", "--log-level", "debug", "serve"],
        ["--config", "b.toml", "--log-level", "error", "serve", "--config", "a.toml", "--log-level", "debug"],
    ],
)
def test_config_and_log_level_go_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.command, args.config, args.log_level) == ("serve", "a.toml", "DEBUG")


def test_check_config_and_seed_take_the_options_after_the_subcommand() -> None:
    args = build_parser().parse_args(["check-config", "--config", "x.toml"])
    # No --log-level: [logging].level decides, else INFO.
    assert (args.config, args.log_level) == ("x.toml", None)
    args = build_parser().parse_args(["seed", "users.json", "--config", "x.toml", "--log-level", "warning"])
    assert (args.file, args.config, args.log_level) == (Path("users.json"), "x.toml", "WARNING")


def test_serve_takes_host_and_port() -> None:
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "8080"])
    assert (args.host, args.port) == ("0.0.0.0", 8080)


@pytest.mark.parametrize("command", ["serve", "seed", "check-config"])
def test_every_subcommand_help_shows_the_common_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--config PATH" in out and "--log-level LEVEL" in out
    if command == "serve":
        assert "--host" in out and "--port" in out


def test_loadtest_help_shows_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["loadtest", "--help"])
    assert "--config PATH" in capsys.readouterr().out


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatcher.__version__ == importlib.metadata.version("trio-dispatcher")
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"dispatcher {dispatcher.__version__}"


@pytest.mark.parametrize("argv", [["serve", "--log-level", "LOUD"], ["--log-level", "LOUD", "check-config"]])
def test_bad_log_level_is_one_line_saying_what_to_use(tmp_path: Path, argv: list[str]) -> None:
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "'LOUD' is not a log level" in line and "DEBUG, INFO, WARNING, ERROR, CRITICAL" in line
    assert not (tmp_path / "var").exists()


# --- start-up -------------------------------------------------------------------------------------


def test_busy_port_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in line
    assert "--port" in line
    # Checked before the embedded store was started: it never ran, nothing is left behind.
    assert not (tmp_path / "var").exists()
    assert processes_mentioning(str(tmp_path)) == []


def test_failure_after_the_store_started_is_one_line_and_stops_it(tmp_path: Path) -> None:
    # The key file is checked when the provider is created, after the embedded store started.
    (tmp_path / "key.json").write_text("not a key")
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(f"""
        [server]
        port = {free_port()}
        [channels.push]
        provider = "fcm"
        [providers.fcm]
        project_id = "demo"
        credentials_file = "{tmp_path / "key.json"}"
    """)
    )
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line[:4].isdigit()]  # not a log line
    assert len(errors) == 1 and errors[0].startswith("configuration error: providers.fcm.credentials_file"), errors
    assert "embedded store listening" in result.stderr  # it had started
    assert processes_mentioning(str(tmp_path)) == []


def test_start_up_says_what_it_uses_in_one_line_each(mongo_url: str, database: Any, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "service.toml"
    # The file's port and the environment's lose to --port.
    config.write_text(
        textwrap.dedent(f"""
        [server]
        port = 1
        [store]
        database = "{database.name}"
        [channels.sms]
        provider = "twilio"
        [providers.twilio]
        account_sid = "{SID}"
        [providers.outbox]
        dir = "{tmp_path / "outbox"}"
    """)
    )
    env = clean_env(MONGODB_URL=mongo_url, TWILIO_AUTH_TOKEN=TOKEN, DISPATCHER__SERVER__PORT="2")
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "serve", "--config", str(config), "--port", str(port)],
            stdout=log,
            stderr=log,
            cwd=tmp_path,
            env=env,
        )
    try:
        wait_ready(process, f"http://127.0.0.1:{port}", log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    lines = log_path.read_text().splitlines()
    [configuration] = [line for line in lines if "configuration:" in line]
    assert str(config) in configuration and "DISPATCHER__SERVER__PORT" in configuration
    [store] = [line for line in lines if "store:" in line and "embedded" not in line]
    assert f"{mongo_url.rstrip('/')} (from MONGODB_URL)" in store
    [channels] = [line for line in lines if "channels:" in line]
    assert "sms via twilio" in channels and f"email via outbox ({tmp_path / 'outbox' / 'email'})" in channels
    assert len([line for line in lines if f"127.0.0.1:{port}" in line]) == 1
    assert process.returncode == 0


def test_without_a_file_start_up_says_defaults_apply(tmp_path: Path) -> None:
    result = run_cli("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # The ambiguity policy that applies, not `null` for "the channel's default".
    channels = json.loads(result.stdout)["channels"]
    assert channels["email"]["on_ambiguous"] == "report" and channels["push"]["on_ambiguous"] == "resend"
    assert "dispatcher: configuration: no ./config.toml, built-in defaults apply" in result.stderr
    assert f"dispatcher: store: embedded, data in {Path('var') / 'store.db'}" in result.stderr


def test_store_is_described_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MONGODB_URL", raising=False)
    settings = settings_from_dict(
        {"store": {"url": "mongodb://admin:s3cr3t@db1.internal:27017,db2.internal/?replicaSet=rs0&authSource=admin"}}
    )
    text = describe_store(settings)
    assert text.startswith("mongodb://db1.internal:27017,db2.internal (from [store].url)")
    assert "s3cr3t" not in text and "admin" not in text


# --- shutdown -------------------------------------------------------------------------------------

DRAIN_SECONDS = 2.0


def wait_ready(process: subprocess.Popen[bytes], base: str, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{base}/-/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"service did not start: {log_path.read_text()}")


async def test_sigterm_mid_send_answers_the_client_within_one_drain_window(
    mongo_url: str, database: Any, tmp_path: Path, nursery: trio.Nursery
) -> None:
    # 20 SMS at 0.5 s each, one at a time: ~10 s of work, far longer than the 2 s window.
    database.users.insert_many(
        [{"_id": f"u{i:02d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(20)]
    )
    fake = FakeTwilio(SID, TOKEN, faults=Faults(latency=0.5))
    twilio_url = await nursery.start(serve_asgi, fake)
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(f"""
        [server]
        port = {port}
        [store]
        database = "{database.name}"
        [dispatcher]
        drain_timeout_seconds = {DRAIN_SECONDS}
        [sender]
        sms = "+15550009999"
        [channels]
        active = ["sms"]
        [channels.sms]
        provider = "twilio"
        concurrency = 1
        max_attempts = 1
        timeout_seconds = 30
        [providers.twilio]
        account_sid = "{SID}"
        api_base_url = "{twilio_url}"
    """)
    )
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "serve", "--config", str(config)],
            stdout=log,
            stderr=log,
            cwd=tmp_path,
            env=clean_env(MONGODB_URL=mongo_url, TWILIO_AUTH_TOKEN=TOKEN),
        )
    base = f"http://127.0.0.1:{port}"
    responses: list[httpx.Response] = []
    try:
        await trio.to_thread.run_sync(wait_ready, process, base, log_path)
        async with httpx.AsyncClient(timeout=30) as http:

            async def post() -> None:
                responses.append(
                    await http.post(
                        f"{base}/send",
                        json={"channels": ["sms"], "clusters": ["all"], "messageContent": "hi {{ user._id }}"},
                    )
                )

            async with trio.open_nursery() as client:
                client.start_soon(post)
                with trio.fail_after(10):
                    while not fake.received:
                        await trio.sleep(0.01)
                process.send_signal(signal.SIGTERM)
                signalled = trio.current_time()
                await trio.to_thread.run_sync(process.wait, 30)
                exited = trio.current_time() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    log_text = log_path.read_text()
    assert process.returncode == 0, log_text
    # One window, not hypercorn's graceful timeout followed by the dispatcher's drain.
    assert DRAIN_SECONDS * 0.9 <= exited < DRAIN_SECONDS + RESPONSE_MARGIN_SECONDS + 1.0, log_text
    # The send went on during the window (one SMS per 0.5 s), and stopped with it.
    assert 3 <= len(fake.received) <= 8
    assert len(fake.attempts) <= len(fake.received) + 1  # at most the one cut short
    [response] = responses
    assert response.status_code == 503, response.text + log_text
    assert response.json()["statusCode"] == 503


async def test_service_exits_once_the_last_answer_is_sent_not_at_the_end_of_the_window(
    mongo_url: str, database: Any, tmp_path: Path
) -> None:
    # 12 SMS at 10/s into the outbox: ~1.2 s of work, well inside a 20 s window.
    database.users.insert_many(
        [{"_id": f"u{i:02d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(12)]
    )
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(f"""
        [server]
        port = {port}
        [store]
        database = "{database.name}"
        [dispatcher]
        drain_timeout_seconds = 20
        [channels.sms]
        rate_per_second = 10
        [providers.outbox]
        dir = "{tmp_path / "outbox"}"
    """)
    )
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "serve", "--config", str(config)],
            stdout=log,
            stderr=log,
            cwd=tmp_path,
            env=clean_env(MONGODB_URL=mongo_url),
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await trio.to_thread.run_sync(wait_ready, process, base, log_path)
        # The client keeps its connection open after the answer (keep-alive), as pools do.
        async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as client:
            responses: list[httpx.Response] = []

            async def post() -> None:
                responses.append(
                    await http.post(
                        f"{base}/send", json={"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"}
                    )
                )

            client.start_soon(post)
            with trio.fail_after(10):
                while not list((tmp_path / "outbox" / "sms").glob("*.json")):
                    await trio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            signalled = trio.current_time()
            await trio.to_thread.run_sync(process.wait, 30)
            exited = trio.current_time() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    log_text = log_path.read_text()
    assert process.returncode == 0, log_text
    [response] = responses
    assert response.status_code == 200 and response.json()["summary"]["sent"] == {"sms": 12}
    assert exited < 5, log_text


# --- dependencies ---------------------------------------------------------------------------------

HARNESS_ONLY = {"rich", "matplotlib", "numpy", "psutil", "apprise", "tomli_w"}


def test_loadtest_without_its_extra_says_which_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an uninstalled module looks like
    assert main(["loadtest", "--users", "1"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "matplotlib" in line and "pip install 'trio-dispatcher[loadtest]'" in line


def test_harness_dependencies_are_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {
            r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower().replace("-", "_")
            for r in requirements
        }

    extras = project["optional-dependencies"]
    assert names(project["dependencies"]) & HARNESS_ONLY == set()
    assert HARNESS_ONLY - {"numpy"} <= names(extras["loadtest"])
    assert "trio-dispatcher[loadtest]" in extras["test"]
    assert {"pytest", "pytest_trio", "hypothesis"} <= names(extras["test"])


def test_only_the_harness_imports_its_extra() -> None:
    offenders = []
    for path in [*(ROOT / "dispatcher").rglob("*.py"), *(ROOT / "actors").rglob("*.py")]:
        if "loadtest" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in modules if m.split(".")[0] in HARNESS_ONLY]
    assert offenders == []


def test_unreadable_api_keys_file_stops_check_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[auth]\nkeys_file = "{tmp_path / "missing-keys"}"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dispatcher.cli import main; raise SystemExit(main())",
            "check-config",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "auth.keys_file" in result.stderr
