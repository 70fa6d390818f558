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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

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
    port = free_port()
    # The server deletes its pid file at exit and logs every command: both go to a scratch
    # folder of ours (never /dev/null, which it would delete), removed when it stops.
    with tempfile.TemporaryDirectory(prefix="dispatcher-store-") as scratch:
        db = "memory"
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            db = str(data_dir / "store.db")
        async with _run_server(port, db, Path(scratch) / "store.log", Path(scratch) / "store.pid") as url:
            yield url


@asynccontextmanager
async def _run_server(port: int, db: str, log_file: Path, pid_file: Path) -> AsyncIterator[str]:
    command = [sys.executable, "-c", "from nx_27017.nx_27017 import main; main()",
               "--host", "127.0.0.1", "--port", str(port), "--db", db,
               "--log-file", str(log_file), "--pid-file", str(pid_file)]
    url = f"mongodb://127.0.0.1:{port}/"
    # The server logs every command to its output: keep it in a file, never in a pipe nobody reads.
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        try:
            await _wait_until_ready(url, process, output)
            log.info("embedded store listening on 127.0.0.1:%d (%s)", port, db)
            yield url
        finally:
            process.terminate()
            with trio.CancelScope(shield=True):
                try:
                    # It can linger on idle client connections; SQLite keeps committed data safe.
                    await trio.to_thread.run_sync(process.wait, 3)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await trio.to_thread.run_sync(process.wait)


async def _wait_until_ready(url: str, process: subprocess.Popen[bytes], output: IO[bytes]) -> None:
    def ping() -> bool:
        client: MongoClient[dict] = MongoClient(url, serverSelectionTimeoutMS=300, connectTimeoutMS=300)
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    with trio.move_on_after(_START_TIMEOUT):
        while True:
            if process.poll() is not None:
                output.seek(0)
                err = output.read().decode(errors="replace")[-2000:]
                raise StoreError(f"the embedded store exited at start-up (code {process.returncode}): {err}")
            if await trio.to_thread.run_sync(ping):
                return
            await trio.sleep(0.1)
    raise StoreError(f"the embedded store did not answer within {_START_TIMEOUT:.0f}s")
