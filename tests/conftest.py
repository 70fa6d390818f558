"""Shared fixtures: one wire-protocol store server per session (real pymongo against it), a
fresh database per test, and settings/dispatcher/app factories."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

from dispatcher import Dispatcher, Settings, open_dispatcher, settings_from_dict

_db_counter = itertools.count()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One nx-27017 server for the whole session (it takes ~2 s to start)."""
    port = _free_port()
    scratch = tmp_path_factory.mktemp("store")
    log = scratch / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", "from nx_27017.nx_27017 import main; main()", "--host", "127.0.0.1",
             "--port", str(port), "--data-dir", "memory", "--log-file", str(scratch / "nx.log"),
             "--pid-file", str(scratch / "nx.pid")],
            stdout=output, stderr=output)
    url = f"mongodb://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        probe: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url, serverSelectionTimeoutMS=200)
        try:
            probe.admin.command("ping")
            break
        except pymongo.errors.PyMongoError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"store server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        finally:
            probe.close()
    yield url
    process.terminate()
    try:
        process.wait(2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
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
