"""The world a load test runs in: the fake providers the selected channels need, an in-memory
store seeded with the synthetic population, and, for several service processes, their Redis.
The service itself is in `service.py`.

The fakes (`fake_providers.py`), the store (nx-27017) and Redis are processes of their own,
started here: they outlive a service that the harness kills (`--kill-at`), as a real deployment's
providers, MongoDB and Redis would, and each one's CPU time is measured apart.

Everything listens on 127.0.0.1 and is stopped when the `open_environment` block exits, whether
it ends normally, on an error or on Ctrl-C.
"""

from __future__ import annotations

import logging
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
from ..settings import StoreSettings
from .fake_providers import Fakes, open_fake_providers
from .options import LoadTestOptions
from .population import Population, seed_users
from .receipts import ReceiptTap
from .redis_server import RedisServer, open_redis

log = logging.getLogger(__name__)

DATABASE = "loadtest"
USERS_COLLECTION = "users"


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


@asynccontextmanager
async def open_environment(options: LoadTestOptions, scratch: Path) -> AsyncIterator[Environment]:
    """Fakes, then the store with `options.users` users; `scratch` is a private directory."""
    population = Population(options.users)
    async with open_fake_providers(options, scratch) as (fakes, tap), AsyncExitStack() as stack:
        store_url = await stack.enter_async_context(open_embedded_store(None))
        redis = await stack.enter_async_context(open_redis(scratch)) if options.cluster else None
        log.info("seeding %d users", population.size)
        # Abandoned on Ctrl-C: the store it writes to is about to stop anyway.
        await trio.to_thread.run_sync(
            seed_users, store_url, DATABASE, USERS_COLLECTION, population, abandon_on_cancel=True
        )
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
