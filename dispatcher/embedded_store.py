"""The embedded store: a local MongoDB-wire-protocol server (nx-27017, on SQLite) for running
without any external database. Started and stopped by the service itself when `[store].url`
is empty; the production code path (pymongo) is the same as against a real MongoDB.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from .errors import StoreError

log = logging.getLogger(__name__)

_START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def open_embedded_store(data_dir: Path | None) -> AsyncIterator[str]:
    """Run the embedded server for the duration of the block and yield its URL.

    `data_dir=None` keeps the data in memory (tests); otherwise it persists in `data_dir/store.db`.
    """
    server = await trio.to_thread.run_sync(EmbeddedServer, data_dir)
    try:
        log.info("embedded store listening on %s (%s)", server.url, data_dir or "memory")
        yield server.url
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.stop)


class EmbeddedServer:
    """The nx-27017 process, started (blocking until it answers a ping) and stopped.

    Blocking on purpose: `open_embedded_store` runs it in a thread, the test suite's session
    fixture calls it directly.
    """

    def __init__(self, data_dir: Path | None) -> None:
        # The server deletes its pid file at exit and logs every command: both go to a scratch
        # folder of ours (never /dev/null, which it would delete), removed when it stops.
        self._scratch = tempfile.TemporaryDirectory(prefix="dispatcher-store-")
        scratch = Path(self._scratch.name)
        db = "memory"
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            db = str(data_dir / "store.db")
        port = free_port()
        self.url = f"mongodb://127.0.0.1:{port}/"
        # Its output is a log of every command: into a file, never a pipe nobody reads.
        self._output = open(scratch / "output.log", "w+b")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from nx_27017.nx_27017 import main; main()",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--db",
                db,
                "--log-file",
                str(scratch / "store.log"),
                "--pid-file",
                str(scratch / "store.pid"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=self._output,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self._process.pid

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._output.seek(0)
                err = self._output.read().decode(errors="replace")[-2000:]
                raise StoreError(f"the embedded store exited at start-up (code {self._process.returncode}): {err}")
            client: MongoClient[dict[str, Any]] = MongoClient(
                self.url, serverSelectionTimeoutMS=300, connectTimeoutMS=300
            )
            try:
                client.admin.command("ping")
                return
            except PyMongoError:
                time.sleep(0.1)
            finally:
                client.close()
        raise StoreError(f"the embedded store did not answer within {_START_TIMEOUT:.0f}s")

    def stop(self) -> None:
        self._process.terminate()
        try:
            # It can linger on idle client connections; SQLite keeps committed data safe.
            self._process.wait(3)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._output.close()
        self._scratch.cleanup()
