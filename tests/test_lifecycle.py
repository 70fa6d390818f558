"""Accepted sends survive their client going away, and shutdown drains them."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from dispatcher import open_dispatcher
from dispatcher.app import create_app
from dispatcher.errors import Interrupted, ShuttingDown

# 12 users at 20 SMS/s: the send takes ~0.6 s, long enough to interrupt.
SLOW_SMS = {"sms": {"rate_per_second": 20, "burst": 1, "concurrency": 2}}
REQUEST = {"channels": ["sms"], "clusters": ["all"], "messageContent": "hi {{ user._id }}"}


def seed_users(database: Any, count: int = 12) -> None:
    database.users.insert_many(
        [{"_id": f"u{i:02d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(count)]
    )


def delivered(outbox: Path) -> int:
    return len(list((outbox / "sms").glob("*.json"))) if (outbox / "sms").exists() else 0


async def wait_for_first_delivery(outbox: Path) -> None:
    with trio.fail_after(10):
        while delivered(outbox) == 0:
            await trio.sleep(0.01)


async def test_client_disconnect_does_not_cancel_deliveries(make_settings: Any, database: Any, outbox: Path) -> None:
    seed_users(database)
    async with open_dispatcher(make_settings(channels=SLOW_SMS)) as d:
        async with create_app(d).test_app() as app:
            client = app.test_client()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.post, "/send", json=REQUEST))
                await wait_for_first_delivery(outbox)
                nursery.cancel_scope.cancel()  # the client goes away mid-send
            assert delivered(outbox) < 12
            assert d.in_flight == 1
            with trio.fail_after(10):
                while d.in_flight:
                    await trio.sleep(0.01)
    assert delivered(outbox) == 12


async def test_leaving_the_dispatcher_drains_sends_in_flight(make_settings: Any, database: Any, outbox: Path) -> None:
    seed_users(database)
    results = []
    async with trio.open_nursery() as nursery:
        async with open_dispatcher(make_settings(channels=SLOW_SMS)) as d:

            async def send() -> None:
                results.append(await d.send(REQUEST))

            nursery.start_soon(send)
            await wait_for_first_delivery(outbox)
        # The block exited only after the send finished.
        assert delivered(outbox) == 12
    [result] = results
    assert result.summary.sent == {"sms": 12}


async def test_drain_timeout_cancels_what_is_left(make_settings: Any, database: Any, outbox: Path) -> None:
    seed_users(database)
    settings = make_settings(channels=SLOW_SMS, dispatcher={"drain_timeout_seconds": 0.1})
    async with trio.open_nursery() as nursery:
        async with open_dispatcher(settings) as d:

            async def send() -> None:
                with pytest.raises(Interrupted, match="shut down before") as interrupted:
                    await d.send(REQUEST)
                # The client learns what was attempted before the end of the drain window.
                partial = interrupted.value.partial.summary
                assert 0 < partial.sent.get("sms", 0) < 12
                assert interrupted.value.job_id is not None

            nursery.start_soon(send)
            await wait_for_first_delivery(outbox)
            started = trio.current_time()
        assert trio.current_time() - started < 5
    assert 0 < delivered(outbox) < 12


async def test_new_sends_are_refused_while_draining(make_settings: Any, database: Any, outbox: Path) -> None:
    seed_users(database)
    async with open_dispatcher(make_settings(channels=SLOW_SMS)) as d:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.send, REQUEST)
            await wait_for_first_delivery(outbox)
            nursery.start_soon(d.drain, 10)
            await trio.sleep(0.01)
            with pytest.raises(ShuttingDown):
                await d.send(REQUEST)


def _write_config(tmp_path: Path, mongo_url: str, database: str, port: int) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(f"""
        [server]
        port = {port}
        [store]
        url = "{mongo_url}"
        database = "{database}"
        [providers.outbox]
        dir = "{tmp_path / "outbox"}"
        [channels.sms]
        rate_per_second = 20
        concurrency = 2
        [dispatcher]
        drain_timeout_seconds = 20
    """)
    )
    return config


def _start_service(config: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    from dispatcher.embedded_store import free_port

    port = free_port()
    config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
    log = open(tmp_path / "service.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "--config", str(config), "serve"], stdout=log, stderr=log, cwd=tmp_path
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/-/ready").status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        assert process.poll() is None, (tmp_path / "service.log").read_text()
        time.sleep(0.1)
    process.kill()
    raise AssertionError("service did not start")


async def test_sigterm_waits_for_deliveries_and_answers_the_client(
    mongo_url: str, database: Any, tmp_path: Path
) -> None:
    seed_users(database)
    config = _write_config(tmp_path, mongo_url, database.name, 0)
    process, base = await trio.to_thread.run_sync(_start_service, config, tmp_path)
    outbox = tmp_path / "outbox"
    try:
        async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
            responses = []

            async def post() -> None:
                responses.append(await http.post(f"{base}/send", json=REQUEST))

            nursery.start_soon(post)
            await wait_for_first_delivery(outbox)
            process.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / "service.log").read_text()
    assert code == 0, log
    assert delivered(outbox) == 12
    [response] = responses
    assert response.status_code == 200
    assert response.json()["summary"]["sent"] == {"sms": 12}
    assert "draining 1 sends in flight" in log


async def test_http_client_disconnect_on_real_server(mongo_url: str, database: Any, tmp_path: Path) -> None:
    seed_users(database)
    config = _write_config(tmp_path, mongo_url, database.name, 0)
    process, base = await trio.to_thread.run_sync(_start_service, config, tmp_path)
    outbox = tmp_path / "outbox"
    try:
        async with httpx.AsyncClient(timeout=0.2) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{base}/send", json=REQUEST)  # gives up and closes the connection
        assert delivered(outbox) < 12
        with trio.fail_after(20):
            while delivered(outbox) < 12:
                await trio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT)
        await trio.to_thread.run_sync(process.wait, 30)
    assert process.returncode == 0
    await trio.sleep(0.3)
    assert delivered(outbox) == 12  # each exactly once
