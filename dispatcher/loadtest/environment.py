"""The world a load test runs in: the fake providers the selected channels need, an in-memory
store seeded with the synthetic population, and, for several service processes, their Redis.
The service itself is in `service.py`.

The store (nx-27017) and Redis are processes of their own, started here: they outlive a service
that the harness kills (`--kill-at`), as a real deployment's MongoDB and Redis would.

Everything listens on 127.0.0.1 and is stopped when the `open_environment` block exits, whether
it ends normally, on an error or on Ctrl-C.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import trio
from pymongo import MongoClient

from ..embedded_store import open_embedded_store
from ..fakes import Faults, serve_asgi
from ..fakes.fcm import FakeFcm, FakeOAuthToken, write_service_account_key
from ..fakes.smtp import SmtpSink
from ..fakes.twilio import FakeTwilio, ReceiptPlan
from ..settings import StoreSettings
from .options import LoadTestOptions
from .population import Population, seed_users
from .receipts import ReceiptTap, StampedList
from .redis_server import RedisServer, open_redis

log = logging.getLogger(__name__)

DATABASE = "loadtest"
USERS_COLLECTION = "users"
FCM_PROJECT = "loadtest-project"


@dataclass
class Fakes:
    """The running fakes (None for a provider no selected channel uses) and how to reach them."""

    sink: SmtpSink | None = None
    twilio: FakeTwilio | None = None
    twilio_url: str = ""
    twilio_sid: str = ""
    twilio_token: str = ""
    oauth: FakeOAuthToken | None = None
    fcm: FakeFcm | None = None
    fcm_url: str = ""
    fcm_project: str = FCM_PROJECT
    key_file: Path | None = None


@dataclass
class Environment:
    options: LoadTestOptions
    population: Population
    store_url: str
    fakes: Fakes
    tap: ReceiptTap
    scratch: Path  # private files (the service-account key): removed at the end
    redis: RedisServer | None = None
    store_pid: int | None = None  # the store's process, for its CPU time

    def clear_ledger(self) -> None:
        """Empty the delivery ledger between measured rounds (blocking), so that a later round
        does not write into a bigger ledger than the first; the indexes stay."""
        settings = StoreSettings()
        client: MongoClient[dict[str, Any]] = MongoClient(self.store_url, serverSelectionTimeoutMS=10_000)
        try:
            db = client[DATABASE]
            for name in (settings.jobs_collection, settings.deliveries_collection, f"{settings.jobs_collection}_keys"):
                db[name].delete_many({})
        finally:
            client.close()

    def ambiguity(self, job_id: str) -> dict[str, dict[str, int]]:
        """Per channel, the job's deliveries left `sending` (ambiguous until resolved) and those
        reconciliation resolved, `found` at the provider or `absent` from it (blocking)."""
        settings = StoreSettings()
        client: MongoClient[dict[str, Any]] = MongoClient(self.store_url, serverSelectionTimeoutMS=10_000)
        try:
            deliveries = client[DATABASE][settings.deliveries_collection]
            counts: dict[str, dict[str, int]] = {}
            query = {"job": job_id, "$or": [{"state": "sending"}, {"reconciled": {"$in": ["found", "absent"]}}]}
            for doc in deliveries.find(query, {"channel": 1, "state": 1, "reconciled": 1}):
                channel = counts.setdefault(doc["channel"], {"sending": 0, "found": 0, "absent": 0})
                if doc.get("state") == "sending":
                    channel["sending"] += 1
                if doc.get("reconciled") in ("found", "absent"):
                    channel[doc["reconciled"]] += 1
            return counts
        finally:
            client.close()


def _faults(options: LoadTestOptions, channel: str, offset: int) -> Faults:
    mix = options.errors_for(channel)
    # A seed per fake so that runs repeat while the fakes do not draw the same sequence.
    return Faults(
        latency=options.latency,
        permanent_rate=mix.permanent,
        transient_rate=mix.transient,
        throttle_rate=mix.throttle,
        retry_after=options.retry_after,
        seed=options.seed * 10 + offset,
    )


@asynccontextmanager
async def open_fakes(options: LoadTestOptions, scratch: Path) -> AsyncIterator[Fakes]:
    """Start the fakes the selected channels need, with the options' latency and error mix."""
    fakes = Fakes()
    channels = set(options.channels)
    async with trio.open_nursery() as nursery:
        try:
            if "email" in channels:
                # record_data=False: a 100,000-message run would otherwise keep every body.
                fakes.sink = SmtpSink(faults=_faults(options, "email", 1), record_data=False)
                fakes.sink.received = StampedList()
                await trio.to_thread.run_sync(fakes.sink.start)
            if channels & {"sms", "voice"}:
                # One account serves both channels; its error mix is SMS's (voice's without SMS).
                fakes.twilio_sid = "AC" + secrets.token_hex(16)
                fakes.twilio_token = secrets.token_hex(16)
                fakes.twilio = FakeTwilio(
                    fakes.twilio_sid,
                    fakes.twilio_token,
                    faults=_faults(options, "sms" if "sms" in channels else "voice", 2),
                    receipts=ReceiptPlan(
                        delay=options.receipts_delay or 0.0, mix={"undelivered": 0.02}, seed=options.seed
                    ),
                )
                fakes.twilio_url = await nursery.start(serve_asgi, fakes.twilio)
            if "push" in channels:
                fakes.oauth = FakeOAuthToken()
                token_url = await nursery.start(serve_asgi, fakes.oauth)
                key = write_service_account_key(scratch / "service-account.json", f"{token_url}/token", FCM_PROJECT)
                fakes.oauth.trust(key)
                fakes.key_file = key.path
                fakes.fcm = FakeFcm(FCM_PROJECT, fakes.oauth, faults=_faults(options, "push", 3))
                fakes.fcm_url = await nursery.start(serve_asgi, fakes.fcm)
            yield fakes
        finally:
            if fakes.sink is not None:
                fakes.sink.stop()  # blocking, briefly: it joins the sink's thread
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_environment(options: LoadTestOptions, scratch: Path) -> AsyncIterator[Environment]:
    """Fakes, then the store with `options.users` users; `scratch` is a private directory."""
    population = Population(options.users)
    async with open_fakes(options, scratch) as fakes, AsyncExitStack() as stack:
        store_url = await stack.enter_async_context(open_embedded_store(None))
        redis = await stack.enter_async_context(open_redis(scratch)) if options.cluster else None
        log.info("seeding %d users", population.size)
        # Abandoned on Ctrl-C: the store it writes to is about to stop anyway.
        await trio.to_thread.run_sync(
            seed_users, store_url, DATABASE, USERS_COLLECTION, population, abandon_on_cancel=True
        )
        tap = ReceiptTap(fakes.sink, fakes.twilio, fakes.fcm)
        yield Environment(options, population, store_url, fakes, tap, scratch, redis, _store_pid(store_url))


def _store_pid(url: str) -> int | None:
    """The embedded store's process: our child listening on the URL's port."""
    port = str(urlsplit(url).port)
    for child in psutil.Process().children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "--port" in command and command[command.index("--port") + 1 :][:1] == [port]:
            return child.pid
    return None
