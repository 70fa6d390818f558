"""A throw-away `redis-server` for tests: a free port on 127.0.0.1, no persistence, stopped (or
killed) by the test; and the session-scoped `redis_url` fixture built on it.

Import the fixture into a test module or conftest.py: `from redis_server import redis_url`.
Tests that need Redis are skipped only when `redis-server` is missing and cannot be installed
(apt-get as root; `DISPATCHER_TESTS_NO_INSTALL=1` forbids trying); CI installs it in `.ci/run`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.embedded_store import free_port
from dispatcher.loadtest.redis_server import answers_ping, server_command

_START_TIMEOUT = 10.0


def find_redis_server() -> tuple[str | None, str]:
    """The `redis-server` binary, installing Debian's package when it is missing and we may
    (root, apt-get); else None and why."""
    found = shutil.which("redis-server")
    if found:
        return found, ""
    if os.environ.get("DISPATCHER_TESTS_NO_INSTALL"):
        return None, "DISPATCHER_TESTS_NO_INSTALL is set"
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None, "installing it needs apt-get as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"]
    for steps in ([install], [["apt-get", "update", "-qq"], install]):
        try:
            if all(
                subprocess.run(step, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=300).returncode
                == 0
                for step in steps
            ):
                break
        except (OSError, subprocess.TimeoutExpired):
            break
    found = shutil.which("redis-server")
    return found, "" if found else "apt-get install redis-server failed"


class RedisServer:
    """`redis-server` on `port` (a free one by default), started at once; `kill()` it and
    `start()` it again on the same port to simulate an outage."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it answers PING."""
        if self._process is not None:
            raise RuntimeError("already running")
        log = open(self._dir / "redis.log", "ab")
        self._process = subprocess.Popen(
            [*server_command(self.binary, self.port, self._dir), "--daemonize", "no"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT
        while not answers_ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                output = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{output}")
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL: no goodbye to its clients) and wait for it."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


def start_redis_server(port: int | None = None) -> RedisServer:
    """A running `RedisServer`, or skip the test when `redis-server` cannot be had."""
    binary, why = find_redis_server()
    if binary is None:
        pytest.skip(f"redis-server is not installed and could not be installed ({why}); CI installs it")
    for _ in range(3):  # the free port may be taken between choosing and binding it
        try:
            return RedisServer(binary, port)
        except RuntimeError:
            if port is not None:
                raise
    return RedisServer(binary, port)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One Redis for the session; tests keep apart by namespace (e.g. one per test)."""
    server = start_redis_server()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of the test's own, to kill and restart."""
    server = start_redis_server()
    try:
        yield server
    finally:
        server.close()
