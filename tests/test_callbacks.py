"""Signed status callbacks, checked by a receiver on loopback that verifies each POST with
`standardwebhooks`: job.finished once per job, delivery.updated batches that add up to what the
provider received, retries with one webhook-id, dead letters and their retry, SSRF refusals,
and callbacks that survive a SIGKILL of the service."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import trio

from dispatcher import open_dispatcher
from dispatcher.app import create_app
from dispatcher.callback_delivery import backoff, classify
from dispatcher.callback_urls import CheckedBackend, RefusedUrl, refused_address
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.webhooks import WebhookReceiver
from dispatcher.settings import CallbackSettings

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
FAST = {
    "allow_http": True,
    "allow_private": True,
    "batch_ms": 100,
    "poll_seconds": 0.05,
    "backoff_base_seconds": 0.05,
    "timeout_seconds": 2,
}


def seed(database: Any, count: int) -> None:
    database.users.insert_many(
        [{"_id": f"u{i:04d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(count)]
    )


def sms_files(outbox: Path) -> set[str]:
    return {p.stem for p in (outbox / "sms").glob("*.json")} if (outbox / "sms").exists() else set()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_CALLBACK_SECRET", SECRET)


@asynccontextmanager
async def service(
    make_settings: Any, receiver: WebhookReceiver, **callbacks: Any
) -> AsyncIterator[tuple[Any, Any, str]]:
    """The app's test client, the dispatcher and the receiver's URL. The secret is what
    DISPATCHER_CALLBACK_SECRET holds (load_settings reads it from there)."""
    secret = os.environ.get("DISPATCHER_CALLBACK_SECRET", "")
    settings = make_settings(callbacks={**FAST, **callbacks, "secret": secret})
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, receiver)
        async with open_dispatcher(settings) as d, create_app(d).test_app() as app:
            yield app.test_client(), d, url
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Any, seconds: float = 15) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.02)


async def settled_outbox(database: Any) -> None:
    """Every callback in the outbox delivered or dead: nothing more will arrive."""
    with trio.fail_after(15):
        while await trio.to_thread.run_sync(database.dispatch_callbacks.count_documents, {"state": "pending"}):
            await trio.sleep(0.05)


async def test_job_finished_arrives_once_per_job_with_the_final_counts(
    make_settings: Any, database: Any, secret_env: None
) -> None:
    seed(database, 3)
    receiver = WebhookReceiver(SECRET)
    async with service(make_settings, receiver) as (client, _, url):
        request = {"channels": ["sms"], "clusters": ["all"], "recipients": ["ghost"], "messageContent": "hi"}
        answer = await client.post(
            "/send", json={**request, "callbackUrl": f"{url}/hooks/a"}, headers={"X-Request-ID": "r-1"}
        )
        job_id = (await answer.get_json())["id"]
        silent = await client.post("/send", json=request)  # no callbackUrl, no default: no callback
        assert silent.status_code == 200
        await wait_until(lambda: receiver.of_type("job.finished"))
        await settled_outbox(database)
        status = await (await client.get(f"/send/{job_id}")).get_json()
    assert receiver.rejected == 0 and len(receiver.received) == 1
    event = receiver.received[0]
    assert event.path == "/hooks/a"
    assert event.body["type"] == "job.finished" and event.body["jobId"] == job_id and event.body["requestId"] == "r-1"
    assert event.body["data"]["status"] == "done"
    assert event.body["data"]["summary"]["sent"] == {"sms": 3} and event.body["data"]["summary"]["failed"] == {"sms": 1}
    assert event.body["data"]["summary"] == status["summary"] and event.body["data"]["id"] == job_id


async def test_delivery_updated_batches_add_up_to_what_the_provider_received(
    make_settings: Any, database: Any, outbox: Path, secret_env: None
) -> None:
    seed(database, 250)
    receiver = WebhookReceiver(SECRET)
    async with service(make_settings, receiver, batch_size=40) as (client, d, url):
        answer = await client.post(
            "/send",
            json={
                "channels": ["sms"],
                "clusters": ["all"],
                "recipients": ["ghost"],
                "messageContent": "hi",
                "callbackUrl": f"{url}/hooks",
                "callbackEvents": ["delivery.updated", "job.finished"],
            },
        )
        job_id = (await answer.get_json())["id"]
        await wait_until(lambda: len(receiver.deliveries()) >= 251 and receiver.of_type("job.finished"))
        await settled_outbox(database)
    batches = receiver.of_type("delivery.updated")
    assert all(1 <= len(b.body["data"]["deliveries"]) <= 40 for b in batches)
    assert all(b.body["jobId"] == job_id for b in batches)
    events = receiver.deliveries()
    sent = {e["userId"] for e in events if e["state"] == "sent"}
    assert len(events) == 251 and len(sent) == 250  # each change once, after de-duplication
    [failed] = [e for e in events if e["state"] == "failed"]
    assert (failed["userId"], failed["channel"], failed["error"]) == ("ghost", "sms", "user not found")
    assert len(sms_files(outbox)) == 250 == len(sent)
    # Batched: several events per POST (how many depends on the machine's pace against batch_ms;
    # the benchmark measures the POSTs of a 10,000-user send).
    assert len(batches) <= len(events) / 4


async def test_receiver_answering_503_twice_gets_the_third_try_with_the_same_webhook_id(
    make_settings: Any, database: Any, secret_env: None
) -> None:
    from prometheus_client import REGISTRY

    def tries(outcome: str, attempt: str) -> float:
        labels = {"event": "job.finished", "outcome": outcome, "attempt": attempt}
        return REGISTRY.get_sample_value("dispatcher_callbacks_total", labels) or 0.0

    before = {key: tries(*key) for key in (("retry", "1"), ("retry", "2"), ("delivered", "3"))}
    seed(database, 1)
    receiver = WebhookReceiver(SECRET, script=[503, 503])
    async with service(make_settings, receiver) as (client, _, url):
        await client.post(
            "/send", json={"channels": ["sms"], "recipients": ["u0000"], "messageContent": "hi", "callbackUrl": url}
        )
        await wait_until(lambda: receiver.received)
        await settled_outbox(database)
    assert receiver.posts == 3 and len(receiver.received) == 1
    assert len(set(receiver.tries)) == 1 and receiver.tries[0] == receiver.received[0].webhook_id
    doc = database.dispatch_callbacks.find_one({"_id": receiver.tries[0]})
    assert doc["state"] == "delivered" and doc["attempts"] == 3
    # The metrics count each try by event, outcome and try number.
    assert {key: tries(*key) - count for key, count in before.items()} == {
        ("retry", "1"): 1,
        ("retry", "2"): 1,
        ("delivered", "3"): 1,
    }


async def test_a_400_makes_a_dead_letter_at_once_and_a_retry_by_the_api_delivers_it(
    make_settings: Any, database: Any, secret_env: None, tmp_path: Path
) -> None:
    seed(database, 1)
    receiver = WebhookReceiver(SECRET, script=[400])
    async with service(make_settings, receiver) as (client, _, url):
        answer = await client.post(
            "/send", json={"channels": ["sms"], "recipients": ["u0000"], "messageContent": "hi", "callbackUrl": url}
        )
        job_id = (await answer.get_json())["id"]

        async def dead() -> list[dict[str, Any]]:
            return (await (await client.get("/callbacks?state=dead")).get_json())["callbacks"]

        with trio.fail_after(15):
            while not (letters := await dead()):
                await trio.sleep(0.05)
        assert receiver.posts == 1 and not receiver.received
        [letter] = letters
        assert letter["jobId"] == job_id and letter["type"] == "job.finished" and letter["attempts"] == 1
        assert letter["lastError"].startswith("HTTP 400")
        retried = await client.post(f"/callbacks/{letter['id']}/retry")
        assert retried.status_code == 200 and (await retried.get_json())["state"] == "pending"
        await wait_until(lambda: receiver.received)
        assert receiver.received[0].webhook_id == letter["id"]
        assert await dead() == []
        again = await client.post(f"/callbacks/{letter['id']}/retry")
        assert again.status_code == 400  # delivered: nothing to retry
        assert (await client.post("/callbacks/nope/retry")).status_code == 404
        assert (await client.get("/callbacks?state=lost")).status_code == 400


@pytest.mark.parametrize(
    "url, settings, words",
    [
        ("http://example.com/hook", {"allow_http": False}, "must use https"),
        ("https://127.0.0.1/hook", {"allow_private": False}, "loopback"),
        ("https://169.254.169.254/latest/meta-data", {"allow_private": False}, "link-local"),
        ("https://10.1.2.3/hook", {"allow_private": False}, "private"),
        ("https://[::1]/hook", {"allow_private": False}, "loopback"),
        ("https://user:pw@example.com/hook", {}, "credentials"),
        ("ftp://example.com/hook", {}, "must be an https URL"),
        ("https://localhost/hook", {"allow_private": False}, "loopback"),
    ],
)
async def test_ssrf_refusals_are_400_naming_the_rule(
    make_settings: Any, database: Any, secret_env: None, url: str, settings: dict[str, Any], words: str
) -> None:
    seed(database, 1)
    async with service(make_settings, WebhookReceiver(SECRET), **settings) as (client, _, _url):
        answer = await client.post(
            "/send", json={"channels": ["sms"], "recipients": ["u0000"], "messageContent": "hi", "callbackUrl": url}
        )
        assert answer.status_code == 400
        body = await answer.get_json()
        assert body["message"].startswith("callbackUrl:") and words in body["message"], body
    assert database.dispatch_jobs.count_documents({}) == 0  # refused before anything was accepted


async def test_callbacks_need_a_secret_and_known_events(make_settings: Any, database: Any, monkeypatch: Any) -> None:
    seed(database, 1)
    monkeypatch.delenv("DISPATCHER_CALLBACK_SECRET", raising=False)
    async with service(make_settings, WebhookReceiver(SECRET)) as (client, _, url):
        request = {"channels": ["sms"], "recipients": ["u0000"], "messageContent": "hi", "callbackUrl": url}
        answer = await client.post("/send", json=request)
        assert answer.status_code == 400 and "secret" in (await answer.get_json())["message"]
        answer = await client.post("/send", json={**request, "callbackEvents": ["job.started"]})
        assert answer.status_code == 400 and "callbackEvents" in (await answer.get_json())["message"]


def test_addresses_refused_without_allow_private() -> None:
    for address in (
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "fd00:ec2::254",
    ):
        assert refused_address(address) is not None, address
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"):
        assert refused_address(address) is None, address


class Rebinding(trio.abc.HostnameResolver):
    """A DNS that answers `first` for `name` once, then `later` (a rebinding attacker's)."""

    def __init__(self, name: str, first: str, later: str) -> None:
        self.name, self.answers, self.later, self.asked = name, [first], later, 0

    async def getaddrinfo(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name != self.name:
            return await trio.to_thread.run_sync(lambda: socket.getaddrinfo(host, port, family, type, proto, flags))
        self.asked += 1
        address = self.answers.pop(0) if self.answers else self.later
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError


class Recording(httpcore.AsyncNetworkBackend):
    """A network that records where connections were asked to go and refuses them all."""

    def __init__(self) -> None:
        self.connected: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        self.connected.append((host, port))
        raise httpcore.ConnectError("recorded, not connected")

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


@pytest.fixture
async def rebinding() -> Any:
    """A resolver for hooks.example whose first answer is public and every later one loopback."""
    resolver = Rebinding("hooks.example", "93.184.216.34", "127.0.0.1")
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    yield resolver
    trio.socket.set_custom_hostname_resolver(previous)


async def test_a_connection_goes_to_the_address_that_was_checked(rebinding: Rebinding) -> None:
    """DNS rebinding: the name is resolved once per connection, checked, and the connection is
    made to that address; it is never resolved again, by anyone, in between."""
    network = Recording()
    backend = CheckedBackend(allow_private=False, inner=network)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("hooks.example", 443)
    assert network.connected == [("93.184.216.34", 443)] and rebinding.asked == 1
    # Now the name answers loopback: refused before any connection is tried.
    with pytest.raises(RefusedUrl, match="loopback address"):
        await backend.connect_tcp("hooks.example", 443)
    assert network.connected == [("93.184.216.34", 443)] and rebinding.asked == 2


async def test_a_name_rebound_to_loopback_after_the_request_is_refused_at_connection(
    make_settings: Any, database: Any, secret_env: None, rebinding: Rebinding
) -> None:
    """Accepted while hooks.example answered a public address; the try's connection resolves it
    to loopback, where the receiver listens: refused there, the callback is dead, nothing sent."""
    seed(database, 1)
    receiver = WebhookReceiver(SECRET)
    async with service(make_settings, receiver, allow_private=False) as (client, d, url):
        port = url.rsplit(":", 1)[1]
        body = {"channels": ["sms"], "recipients": ["u0000"], "messageContent": "hi"}
        answer = await client.post("/send", json={**body, "callbackUrl": f"http://hooks.example:{port}/hooks"})
        assert answer.status_code == 200
        job_id = (await answer.get_json())["id"]
        with trio.fail_after(15):
            while not (dead := await d.callbacks.outbox.message(f"{job_id}.finished")) or dead["state"] != "dead":
                await trio.sleep(0.05)
    assert "loopback address (127.0.0.1)" in dead["last_error"] and dead["attempts"] == 1
    assert receiver.posts == 0 and rebinding.asked == 2


def test_retry_schedule_backs_off_with_jitter_and_honours_retry_after_capped() -> None:
    settings = CallbackSettings(backoff_base_seconds=1, max_backoff_seconds=60, max_retry_after_seconds=120)
    rng = random.Random(7)
    delays = [backoff(attempt, 1, 60, rng) for attempt in range(1, 10)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(60, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert classify(200, {}, 1, settings).kind == "delivered"
    assert classify(503, {}, 1, settings).kind == "retry"
    assert classify(429, {"Retry-After": "30"}, 1, settings).delay == 30
    assert classify(429, {"Retry-After": "86400"}, 1, settings).delay == 120  # capped
    for status in (400, 401, 404, 410, 301):
        assert classify(status, {}, 1, settings).kind == "dead", status


async def test_slow_receiver_does_not_delay_another(make_settings: Any, database: Any, secret_env: None) -> None:
    """A receiver that takes 3 s per answer holds only its own POSTs: the other receiver's
    callbacks arrive meanwhile."""
    seed(database, 1)
    slow = WebhookReceiver(SECRET, delay=3)
    fast = WebhookReceiver(SECRET)
    async with trio.open_nursery() as nursery:
        fast_url = await nursery.start(serve_asgi, fast)
        async with service(make_settings, slow, per_host_concurrency=1, timeout_seconds=5) as (client, _, slow_url):
            request = {"channels": ["sms"], "recipients": ["u0000"], "messageContent": "hi"}
            for _ in range(3):
                await client.post("/send", json={**request, "callbackUrl": slow_url})
            await client.post("/send", json={**request, "callbackUrl": fast_url})
            with trio.fail_after(2.5):  # before the slow receiver answered even once
                while not fast.received:
                    await trio.sleep(0.02)
            assert not slow.received
        nursery.cancel_scope.cancel()


async def test_sigkill_with_callbacks_pending_then_restart_delivers_every_event(
    mongo_url: str, database: Any, tmp_path: Path
) -> None:
    from service_process import Service

    users = 300
    seed(database, users)
    config = tmp_path / "config.toml"
    config.write_text(f"""
[channels]
active = ["sms"]
[channels.sms]
concurrency = 4
rate_per_second = 400
# The resumed run waits for what the killed one left `sending` until the attempt's timeout
# (10 s by default) and 5 s have passed since its claim.
timeout_seconds = 5
[providers.outbox]
dir = "{tmp_path / "outbox"}"
[sender]
sms = "+15550009999"
[store]
lease_seconds = 1.5
[callbacks]
allow_http = true
allow_private = true
batch_size = 25
batch_ms = 50
poll_seconds = 0.05
backoff_base_seconds = 0.05
timeout_seconds = 1
per_host_concurrency = 1
""")
    # A slow receiver: callbacks pile up in the outbox while the send runs.
    receiver = WebhookReceiver(SECRET, delay=0.05)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, receiver)
        service = Service(config, mongo_url, database.name, tmp_path / "service.log")
        service.env["DISPATCHER_CALLBACK_SECRET"] = SECRET
        try:
            await service.start()
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.post(
                    f"http://127.0.0.1:{service.port}/send?async=true",
                    json={
                        "channels": ["sms"],
                        "clusters": ["all"],
                        "messageContent": "hi",
                        "callbackUrl": f"{url}/hooks",
                        "callbackEvents": ["delivery.updated", "job.finished"],
                    },
                )
            job_id = answer.json()["id"]
            with trio.fail_after(30):
                while len(receiver.received) < 2:
                    await trio.sleep(0.01)
            service.kill()
            # What was written and not reported at the kill: messages pending, or only stamps.
            written = {(d["user"], d["state"]) for d in database.dispatch_deliveries.find({"job": job_id})}
            owed = {item for item in written if item[1] != "sending"} - reported(receiver)
            await service.start()
            with trio.fail_after(60):
                while not receiver.of_type("job.finished") or len(final := finals(database, job_id)) < users:
                    await trio.sleep(0.1)
                # Every delivery's final state reaches the receiver, at least once.
                while not set(final.items()) <= reported(receiver):
                    await trio.sleep(0.1)
            await settled_outbox(database)
        finally:
            service.stop()
            nursery.cancel_scope.cancel()
    print(f"written, not reported at the kill: {len(owed)}; POSTs {receiver.posts}, unique {len(receiver.unique())}")
    assert owed, "everything written was reported at the kill: the test did not test it"
    assert receiver.rejected == 0
    [finished] = receiver.of_type("job.finished")
    assert finished.body["data"]["status"] == "done"


def reported(receiver: WebhookReceiver) -> set[tuple[str, str]]:
    """(user, state) of every delivery.updated event received."""
    return {(e["userId"], e["state"]) for e in receiver.deliveries()}


def finals(database: Any, job_id: str) -> dict[str, str]:
    """Each user's delivery state, once no longer `sending`."""
    return {
        d["user"]: d["state"] for d in database.dispatch_deliveries.find({"job": job_id}) if d["state"] != "sending"
    }


async def test_dead_letters_belong_to_their_key_and_the_cli_lists_and_retries_them(
    make_settings: Any, database: Any, secret_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import io
    from functools import partial

    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    from dispatcher import remote
    from dispatcher.cli import build_parser

    keys = {"alice": "alice-key", "bob": "bob-key"}
    keys_file = tmp_path / "keys"
    keys_file.write_text("".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}\n" for n, k in keys.items()))
    seed(database, 1)
    receiver = WebhookReceiver(SECRET, script=[410])
    settings = make_settings(callbacks={**FAST, "secret": SECRET}, auth={"keys_file": str(keys_file)})
    config = Config()
    config.bind = ["127.0.0.1:0"]
    async with trio.open_nursery() as nursery:
        hook = await nursery.start(serve_asgi, receiver)
        async with open_dispatcher(settings) as d:
            urls = await nursery.start(
                partial(hypercorn_serve, create_app(d), config, shutdown_trigger=trio.sleep_forever)
            )

            def cli(key: str, *argv: str) -> tuple[int, str]:
                monkeypatch.setenv("DISPATCHER_API_KEY", keys[key])
                out = io.StringIO()
                return remote.run(
                    build_parser().parse_args(["callbacks", *argv, "--url", urls[0]]), out
                ), out.getvalue()

            async def run_cli(key: str, *argv: str) -> tuple[int, str]:
                return await trio.to_thread.run_sync(partial(cli, key, *argv))

            async with httpx.AsyncClient(base_url=urls[0], headers={"X-API-Key": keys["alice"]}) as http:
                await http.post(
                    "/send",
                    json={"channels": ["sms"], "recipients": ["u0000"], "messageContent": "hi", "callbackUrl": hook},
                )
                with trio.fail_after(15):
                    while not (await http.get("/callbacks")).json()["callbacks"]:
                        await trio.sleep(0.05)
                [letter] = (await http.get("/callbacks")).json()["callbacks"]
            code, table = await run_cli("alice", "list")
            assert code == 0 and letter["id"] in table and "HTTP 410" in table
            code, table = await run_cli("bob", "list")
            assert code == 0 and letter["id"] not in table  # another key's callbacks are not shown
            assert (await run_cli("bob", "retry", letter["id"]))[0] == 1  # ... nor retried (404)
            code, out = await run_cli("alice", "retry", letter["id"])
            assert code == 0 and '"state": "pending"' in out
            await wait_until(lambda: receiver.received)
            assert receiver.received[0].webhook_id == letter["id"]
        nursery.cancel_scope.cancel()


async def test_sigkill_after_receipts_then_restart_reports_every_receipt(
    mongo_url: str, database: Any, tmp_path: Path
) -> None:
    """Receipts are written; their delivery.updated events are, at the kill, partly only the
    stamps on those writes (not yet read into a message: batch_ms holds the last partial batch).
    After the restart the killed process's cursor is adopted and every receipt's state arrives."""
    from service_process import Service

    from dispatcher.fakes.twilio import FakeTwilio, ReceiptPlan

    users = 210  # 210 outcomes + 210 receipts: 16 full batches of 25 and 20 events left waiting
    seed(database, users)
    fake = FakeTwilio("AC123", "secret", receipts=ReceiptPlan(delay=0.05, mix={"undelivered": 0.3}, seed=3))
    receiver = WebhookReceiver(SECRET, delay=0.1)
    async with trio.open_nursery() as nursery:
        twilio_url = await nursery.start(serve_asgi, fake)
        url = await nursery.start(serve_asgi, receiver)
        config = tmp_path / "config.toml"
        service = Service(config, mongo_url, database.name, tmp_path / "service.log")
        config.write_text(f"""
[channels]
active = ["sms"]
[channels.sms]
provider = "twilio"
concurrency = 8
[providers.twilio]
account_sid = "AC123"
api_base_url = "{twilio_url}"
status_callback_base_url = "http://127.0.0.1:{service.port}"
[sender]
sms = "+15550009999"
[store]
lease_seconds = 1.5
[callbacks]
allow_http = true
allow_private = true
batch_size = 25
batch_ms = 8000
poll_seconds = 0.05
timeout_seconds = 1
per_host_concurrency = 1
""")
        service.env["DISPATCHER_CALLBACK_SECRET"] = SECRET
        try:
            await service.start()
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.post(
                    f"http://127.0.0.1:{service.port}/send?async=true",
                    json={
                        "channels": ["sms"],
                        "clusters": ["all"],
                        "messageContent": "hi",
                        "callbackUrl": f"{url}/hooks",
                        "callbackEvents": ["delivery.updated"],
                    },
                )
            job_id = answer.json()["id"]
            finals = {"state": {"$in": ["delivered", "undelivered"]}, "job": job_id}
            with trio.fail_after(60):
                while await trio.to_thread.run_sync(database.dispatch_deliveries.count_documents, finals) < users:
                    await trio.sleep(0.02)
            service.kill()
            # What the outbox held as messages at the kill: every other event was only a stamp.
            in_messages = {
                (e["userId"], e["state"])
                for m in database.dispatch_callbacks.find({"job": job_id, "role": "message"})
                for e in json.loads(m["body"])["data"]["deliveries"]
            }
            await service.start()
            final = {d["user"]: d["state"] for d in database.dispatch_deliveries.find({"job": job_id})}
            with trio.fail_after(60):
                while not set(final.items()) <= reported(receiver):
                    await trio.sleep(0.1)
            await settled_outbox(database)
        finally:
            service.stop()
            nursery.cancel_scope.cancel()
    only_stamped = set(final.items()) - in_messages
    print(f"receipt events only stamped at the kill: {len(only_stamped)}; POSTs {receiver.posts}")
    assert only_stamped, "every receipt event was in a message at the kill: the test did not test it"
    assert receiver.rejected == 0 and len(final) == users
    assert {state for state in final.values()} == {"delivered", "undelivered"}
    assert set(final.items()) | {(u, "sent") for u in final} <= reported(receiver)
    # The adopted cursor was read to its end and removed; the new process holds its own.
    assert database.dispatch_callbacks.count_documents({"role": "cursor"}) == 1
