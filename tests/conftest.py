"""Shared fixtures: one wire-protocol store server per session (real pymongo against it), a
fresh database per test, and settings/dispatcher/app factories."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

from dispatcher import Dispatcher, Settings, open_dispatcher, settings_from_dict
from dispatcher.embedded_store import EmbeddedServer
from redis_server import own_redis, redis_url  # noqa: F401  (fixtures: the session's redis-server, a test's own)

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    """One in-memory store server for the whole session (it takes ~2 s to start)."""
    server = EmbeddedServer(None)
    yield server.url
    server.stop()


@pytest.fixture
def database(mongo_url: str) -> Iterator[pymongo.database.Database]:
    """A database of its own for each test."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url)
    db = client[f"test_{os.getpid()}_{next(_db_counter)}"]
    yield db
    client.drop_database(db.name)
    client.close()


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


@pytest.fixture
def make_settings(mongo_url: str, database: pymongo.database.Database, tmp_path: Path) -> Callable[..., Settings]:
    """Settings on the test's database and outbox directory; keyword sections override."""

    def make(**sections: Any) -> Settings:
        base = {
            "store": {"url": mongo_url, "database": database.name},
            "providers": {"outbox": {"dir": str(tmp_path / "outbox")}},
            "sender": {"email": "noreply@example.com", "sms": "+15550009999", "voice": "+15550009998"},
            "dispatcher": {"drain_timeout_seconds": 5},
        }
        return settings_from_dict(_merge(base, sections))

    return make


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox"


@pytest.fixture
async def dispatcher(make_settings: Callable[..., Settings]) -> AsyncIterator[Dispatcher]:
    async with open_dispatcher(make_settings()) as d:
        yield d


@pytest.fixture
async def client(dispatcher: Dispatcher) -> AsyncIterator[Any]:
    """Quart test client with the lifespan running."""
    from dispatcher.app import create_app

    app = create_app(dispatcher)
    async with app.test_app() as test_app:
        yield test_app.test_client()
