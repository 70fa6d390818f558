"""The world a load test runs in: the fake providers the selected channels need, and an
in-memory store seeded with the synthetic population. The service itself is in `service.py`.

Everything listens on 127.0.0.1 and is stopped when the `open_environment` block exits, whether
it ends normally, on an error or on Ctrl-C.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ..embedded_store import open_embedded_store
from ..fakes import Faults, serve_asgi
from ..fakes.fcm import FakeFcm, FakeOAuthToken, write_service_account_key
from ..fakes.smtp import SmtpSink
from ..fakes.twilio import FakeTwilio
from .options import LoadTestOptions
from .population import Population, seed_users
from .receipts import ReceiptTap, StampedList

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


def _faults(options: LoadTestOptions, channel: str, offset: int) -> Faults:
    mix = options.errors_for(channel)
    # A seed per fake so that runs repeat while the fakes do not draw the same sequence.
    return Faults(latency=options.latency, permanent_rate=mix.permanent, transient_rate=mix.transient,
                  throttle_rate=mix.throttle, retry_after=options.retry_after, seed=options.seed * 10 + offset)


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
                fakes.twilio = FakeTwilio(fakes.twilio_sid, fakes.twilio_token,
                                          faults=_faults(options, "sms" if "sms" in channels else "voice", 2))
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
    async with open_fakes(options, scratch) as fakes:
        async with open_embedded_store(None) as store_url:
            log.info("seeding %d users", population.size)
            # Abandoned on Ctrl-C: the store it writes to is about to stop anyway.
            await trio.to_thread.run_sync(seed_users, store_url, DATABASE, USERS_COLLECTION, population,
                                          abandon_on_cancel=True)
            tap = ReceiptTap(fakes.sink, fakes.twilio, fakes.fcm)
            yield Environment(options, population, store_url, fakes, tap, scratch)
