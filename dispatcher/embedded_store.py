"""The embedded store: a local MongoDB-wire-protocol server (nx-27017, on SQLite) for running
without any external database. Started and stopped by the service itself when `[store].url`
is empty; the production code path (pymongo) is the same as against a real MongoDB.

Rules, and why:
- One store per data directory: `store.lock` in it is held (`flock`) by the process that started
  the store and by the store itself, so a second service on the same files refuses to start
  (`StoreInUse`) instead of opening the same SQLite database beside the first.
- The store dies with whoever started it (`children.die_with_parent`): a service killed outright
  leaves no store behind holding the files.
- The service supervises the store it started (`open_supervised_store`): a store that exits is
  restarted on the same address with a backoff; when it cannot be kept up the service stops with
  an error (exit status 1) so that whatever runs it restarts the whole thing.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
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

from .children import die_with_parent
from .errors import ConfigError, StoreError, StoreInUse

log = logging.getLogger(__name__)

_START_TIMEOUT = 30.0
LOCK_FILE = "store.lock"
# How often the supervisor looks at the store process; a death is noticed within this.
_WATCH_SECONDS = 0.2
# Pauses before each restart attempt after a death; when all fail, the service gives up.
RESTART_BACKOFF_SECONDS = (0.0, 0.5, 1.0, 2.0, 4.0)
# A store that keeps dying is not kept alive for ever: this many restarts within the window and
# the service gives up too.
MAX_RESTARTS_PER_WINDOW = 5
RESTART_WINDOW_SECONDS = 60.0
# `/-/healthz` fails once the store has been down this long (a restart takes well under it).
DOWN_GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lock_data_dir(data_dir: Path) -> int:
    """Create `data_dir` and take its lock; the open file descriptor holds it (close to release).

    `StoreInUse` when another process holds it (naming its pid); `ConfigError` naming
    `[store].data_dir` when the directory cannot be created or written.
    """
    path = data_dir / LOCK_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"store.data_dir: cannot use {data_dir} for the embedded store: {(exc.strerror or str(exc)).lower()}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUse(
            f"the embedded store in {data_dir} is in use by another process (pid {holder}, holding {path}); "
            "stop it first, or give this one another [store].data_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@asynccontextmanager
async def open_embedded_store(data_dir: Path | None) -> AsyncIterator[str]:
    """Run the embedded server (supervised) for the duration of the block and yield its URL.

    `data_dir=None` keeps the data in memory (tests); otherwise it persists in `data_dir/store.db`.
    """
    async with open_supervised_store(data_dir) as store:
        yield store.url


class SupervisedStore:
    """What the service knows of the store it runs: its URL and whether it is up."""

    def __init__(self, server: EmbeddedServer) -> None:
        self.server = server
        self.url = server.url
        self.restarts = 0
        self.down_since: float | None = None

    def down_for(self) -> float:
        """Seconds the store has been down (0 while it is up)."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    @property
    def alive(self) -> bool:
        """False once the store has been down longer than `DOWN_GRACE_SECONDS` (liveness)."""
        return self.down_for() <= DOWN_GRACE_SECONDS

    async def watch(self) -> None:
        """Restart the store whenever it exits; `StoreError` when it cannot be kept up."""
        recent: collections.deque[float] = collections.deque(maxlen=MAX_RESTARTS_PER_WINDOW)
        while True:
            await trio.sleep(_WATCH_SECONDS)
            code = self.server.poll()
            if code is None:
                continue
            self.down_since = time.monotonic()
            log.error("the embedded store (pid %d) exited with status %d; restarting it", self.server.pid, code)
            if len(recent) == recent.maxlen and time.monotonic() - recent[0] < RESTART_WINDOW_SECONDS:
                raise StoreError(
                    f"the embedded store exited {len(recent) + 1} times within {RESTART_WINDOW_SECONDS:.0f}s; giving up"
                )
            last: Exception | None = None
            for pause in RESTART_BACKOFF_SECONDS:
                await trio.sleep(pause)
                self.server.spawn()  # from this (the main) thread: see children.py
                try:
                    await trio.to_thread.run_sync(self.server.wait_until_ready)
                except StoreError as exc:
                    self.server.terminate()
                    log.error("the embedded store did not restart: %s", exc)
                    last = exc
                    continue
                break
            else:
                raise StoreError(
                    f"the embedded store could not be restarted ({len(RESTART_BACKOFF_SECONDS)} attempts): {last}"
                )
            recent.append(time.monotonic())
            self.restarts += 1
            log.warning(
                "the embedded store is back (pid %d, restart %d, down %.1fs)",
                self.server.pid,
                self.restarts,
                self.down_for(),
            )
            self.down_since = None


@asynccontextmanager
async def open_supervised_store(data_dir: Path | None) -> AsyncIterator[SupervisedStore]:
    """Start the embedded server, restart it whenever it exits, stop it at the end of the block.

    When it cannot be kept up the block is cancelled and `StoreError` raised.
    """
    server = EmbeddedServer(data_dir, start=False)
    try:
        server.spawn()  # from this (the main) thread: see children.py
        await trio.to_thread.run_sync(server.wait_until_ready)
        log.info("embedded store listening on %s (%s)", server.url, data_dir or "memory")
        store = SupervisedStore(server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.watch)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.stop)


class EmbeddedServer:
    """The nx-27017 process: started (blocking until it answers a ping), restarted, stopped.

    `EmbeddedServer(data_dir)` blocks until the store answers: the test suite's session fixture
    and the supervisor of `serve --workers N` call it directly. With a `data_dir` it holds the
    directory's lock (`lock_data_dir`) from creation to `stop`, and so does the store process.
    """

    def __init__(self, data_dir: Path | None, *, start: bool = True) -> None:
        self._lock_fd = lock_data_dir(data_dir) if data_dir is not None else None
        # The server deletes its pid file at exit and logs every command: both go to a scratch
        # folder of ours (never /dev/null, which it would delete), removed when it stops.
        self._scratch = tempfile.TemporaryDirectory(prefix="dispatcher-store-")
        self._db = str(data_dir / "store.db") if data_dir is not None else "memory"
        self._port = free_port()
        self.url = f"mongodb://127.0.0.1:{self._port}/"
        self._output: Any = None
        self._process: subprocess.Popen[bytes] | None = None
        if start:
            try:
                self.spawn()
                self.wait_until_ready()
            except BaseException:
                self.stop()
                raise

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def poll(self) -> int | None:
        """The exit status once the process has ended, else None."""
        assert self._process is not None
        return self._process.poll()

    def spawn(self) -> None:
        """Start the process (not waiting for it to answer), on the same port every time."""
        scratch = Path(self._scratch.name)
        if self._output is not None:
            self._output.close()
        # Its output is a log of every command: into a file, never a pipe nobody reads.
        self._output = open(scratch / "output.log", "w+b")
        pass_fds = (self._lock_fd,) if self._lock_fd is not None else ()
        if self._lock_fd is not None:
            os.set_inheritable(self._lock_fd, True)
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from nx_27017.nx_27017 import main; main()",
                "--host",
                "127.0.0.1",
                "--port",
                str(self._port),
                "--db",
                self._db,
                "--log-file",
                str(scratch / "store.log"),
                "--pid-file",
                str(scratch / "store.pid"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=self._output,
            pass_fds=pass_fds,
            preexec_fn=die_with_parent(),
        )

    def restart(self) -> None:
        """Start the process again after it exited, blocking until it answers; `StoreError` when
        every attempt of `RESTART_BACKOFF_SECONDS` failed."""
        last: Exception | None = None
        for pause in RESTART_BACKOFF_SECONDS:
            time.sleep(pause)
            self.spawn()
            try:
                self.wait_until_ready()
                return
            except StoreError as exc:
                self.terminate()
                log.error("the embedded store did not restart: %s", exc)
                last = exc
        raise StoreError(f"the embedded store could not be restarted ({len(RESTART_BACKOFF_SECONDS)} attempts): {last}")

    def wait_until_ready(self) -> None:
        assert self._process is not None
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

    def terminate(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            # It can linger on idle client connections; SQLite keeps committed data safe.
            self._process.wait(3)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        self.terminate()
        if self._output is not None:
            self._output.close()
        self._scratch.cleanup()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
