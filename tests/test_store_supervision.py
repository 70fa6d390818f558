"""The service supervises the embedded store it started (issue 17, point 1), shown with a real
SIGKILL of the `nx-27017` child in the middle of a send: the store is restarted, the job completes
with every (user, channel) pair attempted once (counted at a fake Twilio and in the outbox), and
`/-/healthz` (liveness) stays up through a quick restart while `/-/ready` follows the store."""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import socket
from collections import Counter
from functools import partial
from pathlib import Path

import httpx
import psutil
import pytest
import trio
from service_process import CLI, Service

from dispatcher.embedded_store import free_port
from dispatcher.fakes.faults import Faults
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio

USERS = 2000
CONCURRENCY = 8
LATENCY = 0.01


def _config(tmp_path: Path, twilio_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[channels]
active = ["email", "sms"]
[channels.sms]
provider = "twilio"
concurrency = {CONCURRENCY}
[providers.twilio]
account_sid = "AC123"
api_base_url = "{twilio_url}"
# The fake lists a message as soon as it has taken it: the SMS the kill left ambiguous are
# reconciled without the settling wait kept for the real Twilio (30 s by default).
reconcile_settle_seconds = 0.5
[providers.outbox]
dir = "{tmp_path / "outbox"}"
[sender]
sms = "+15550009999"
email = "noreply@example.com"
[store]
data_dir = "{tmp_path / "var"}"
""")
    return path


def _store_process_of(pid: int) -> list[psutil.Process]:
    return [
        c
        for c in psutil.Process(pid).children()
        if c.status() != psutil.STATUS_ZOMBIE and "nx_27017" in " ".join(c.cmdline())
    ]


def _store_process(service_pid: int) -> psutil.Process:
    [store] = _store_process_of(service_pid)
    return store


async def test_sigkill_of_the_embedded_store_mid_send_restarts_it_and_the_job_completes(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    users = [
        {
            "_id": f"u{i:04d}",
            "phoneNumber": f"+1555{i:07d}",
            "emailAddress": f"u{i:04d}@example.com",
            "clusters": ["all"],
        }
        for i in range(USERS)
    ]
    seed.write_text(json.dumps({"users": users, "templates": []}))
    fake = FakeTwilio("AC123", "secret", Faults(latency=LATENCY))
    async with trio.open_nursery() as nursery:
        config = _config(tmp_path, await nursery.start(serve_asgi, fake))
        service = Service(config, None, None, tmp_path / "service.log")
        seeded = await trio.run_process(
            [*CLI, "--config", str(config), "seed", str(seed)],
            env=service.env,
            capture_stdout=True,
            capture_stderr=True,
        )
        assert seeded.returncode == 0, seeded.stderr
        try:
            await service.start(ready="/-/ready")
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
                response = await client.post(
                    "/send?async=true",
                    json={
                        "channels": ["email", "sms"],
                        "clusters": ["all"],
                        "messageContent": "hi",
                        "messageTitle": "t",
                    },
                )
                assert response.status_code == 202, response.text
                job_id = response.json()["id"]
                with trio.fail_after(30):
                    while len(fake.received) < USERS // 3:
                        await trio.sleep(0.01)
                assert service.process is not None
                store = _store_process(service.process.pid)
                store.send_signal(signal.SIGKILL)
                killed_at = len(fake.received)
                # Liveness holds through a quick restart; readiness may dip; the store comes back.
                healthz = set()
                with trio.fail_after(30):
                    while True:
                        healthz.add((await client.get("/-/healthz")).status_code)
                        try:
                            restarted = _store_process(service.process.pid)
                        except ValueError:
                            restarted = None
                        if restarted is not None and restarted.pid != store.pid:
                            break
                        await trio.sleep(0.05)
                assert healthz == {200}
                with trio.fail_after(120):
                    while True:
                        job = (await client.get(f"/send/{job_id}")).json()
                        if job.get("status") in ("done", "failed", "cancelled"):
                            break
                        await trio.sleep(0.2)
                failures = (await client.get(f"/send/{job_id}/failures?limit=1000")).json()["failures"]
                assert (await client.get("/-/healthz")).status_code == 200
                assert (await client.get("/-/ready")).status_code == 200
        finally:
            service.stop(30)
            nursery.cancel_scope.cancel()

    text = service.log.read_text()
    assert "the embedded store (pid" in text and "is back" in text, text[-3000:]
    assert job["status"] == "done", job
    summary = job["summary"]
    phone_of = {u["phoneNumber"]: u["_id"] for u in users}
    sms = Counter(phone_of[r.form["To"]] for r in fake.received)
    mails = Counter(
        str(email.message_from_bytes(p.read_bytes(), policy=email.policy.default)["To"]).split("@")[0]
        for p in (tmp_path / "outbox" / "email").glob("*.eml")
    )
    ambiguous = {(f["userId"], f["channel"]) for f in failures if f["error"].startswith("outcome unknown")}
    assert {f["channel"] for f in failures} <= {"sms", "email"}
    assert len(failures) == len(ambiguous), failures[:5]  # nothing failed but for the kill
    for channel, received in (("sms", sms), ("email", mails)):
        # 0 duplicated: nobody got a channel's message twice, unless it is reported ambiguous.
        twice = {u for u, n in received.items() if n > 1}
        assert twice <= {u for u, c in ambiguous if c == channel}, (channel, twice)
        # 0 lost: every user got it, or its failure says the outcome is unknown.
        missing = {u["_id"] for u in users} - set(received)
        assert missing <= {u for u, c in ambiguous if c == channel}, (channel, len(missing))
        assert summary["sent"].get(channel, 0) + sum(1 for _, c in ambiguous if c == channel) == USERS
    print(f"killed at {killed_at} SMS; ambiguous {len(ambiguous)}; sent {summary['sent']}")


async def test_healthz_fails_while_the_store_stays_down_and_the_service_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that cannot come back (its port taken) fails liveness after the grace period, and
    once the restarts are spent the service stops with `StoreError` (the CLI exits 1)."""
    from dispatcher import embedded_store, settings_from_dict
    from dispatcher.cli import serve
    from dispatcher.errors import StoreError

    monkeypatch.setattr(embedded_store, "DOWN_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(embedded_store, "RESTART_BACKOFF_SECONDS", (1.0, 1.0))
    settings = settings_from_dict(
        {
            "server": {"port": free_port()},
            "store": {"data_dir": str(tmp_path / "var")},
            "providers": {"outbox": {"dir": str(tmp_path / "outbox")}},
        }
    )
    statuses: list[tuple[int, str]] = []
    squatter = socket.socket()
    try:
        with pytest.raises(BaseException) as raised:  # noqa: PT011 - a group holding StoreError
            # The session's own store is a child of this process too: the service's is the new one.
            before = {p.pid for p in _store_process_of(os.getpid())}
            async with trio.open_nursery() as nursery:
                [url] = await nursery.start(partial(serve, settings))
                async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                    assert (await client.get("/-/healthz")).status_code == 200
                    [store] = [p for p in _store_process_of(os.getpid()) if p.pid not in before]
                    port = int(store.cmdline()[store.cmdline().index("--port") + 1])
                    store.send_signal(signal.SIGKILL)
                    store.wait(5)
                    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    squatter.bind(("127.0.0.1", port))
                    squatter.listen()
                    with trio.fail_after(30):
                        while True:
                            response = await client.get("/-/healthz")
                            statuses.append((response.status_code, response.json().get("message", "")))
                            await trio.sleep(0.2)
    finally:
        squatter.close()
    assert statuses, raised.value
    assert statuses[-1][0] == 503 and "the embedded store has been down for" in statuses[-1][1]
    # Beside it, the test's own request cut short as the service stops.
    assert isinstance(raised.value, BaseExceptionGroup)
    stopped, _ = raised.value.split(StoreError)
    assert "the embedded store could not be restarted (2 attempts)" in repr(stopped)
