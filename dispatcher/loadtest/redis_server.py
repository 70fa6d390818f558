"""The cluster's Redis for a multi-process load test: `redis-server` on a free port of 127.0.0.1,
without persistence, started by the harness and stopped with it; and its command counters
(`INFO commandstats`), from which the harness reads the rate limiter's round trips across every
service process without asking the services."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ..embedded_store import free_port
from ..errors import DispatcherError

START_TIMEOUT_SECONDS = 10.0
# The rate limiter's reservations are script calls (coredis runs a registered script by EVALSHA,
# falling back to EVAL); its pings and the script's loading are not per delivery.
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall")
HOUSEKEEPING = frozenset({"ping", "info", "script", "client", "hello", "config", "select", "command"})


class RedisNotAvailable(DispatcherError):
    """`redis-server` is not installed, or did not start."""


@dataclass(frozen=True, slots=True)
class RedisServer:
    url: str
    port: int
    pid: int

    def command_calls(self) -> dict[str, int]:
        """Calls per command since the server started (blocking, one short round trip)."""
        return command_calls(self.port)


def script_calls(calls: dict[str, int]) -> int:
    return sum(calls.get(name, 0) for name in SCRIPT_COMMANDS)


def work_commands(calls: dict[str, int]) -> dict[str, int]:
    """The commands that serve deliveries (the limiter's scripts, the shared fan-outs' streams),
    without the housekeeping: readiness pings, INFO (ours), script loading, connection set-up."""
    return {name: n for name, n in calls.items() if n and name.split("|")[0] not in HOUSEKEEPING}


@asynccontextmanager
async def open_redis(scratch: Path) -> AsyncIterator[RedisServer]:
    """Start `redis-server --port P --save "" --appendonly no` on a free port; stop it on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisNotAvailable(
            "--replicas, --workers and --redis start a Redis for the cluster-wide limits: "
            "redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)"
        )
    port = free_port()
    log_path = scratch / "redis.log"
    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            server_command(binary, port, scratch),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        ready = False
        with trio.move_on_after(START_TIMEOUT_SECONDS):
            while not await trio.to_thread.run_sync(answers_ping, port):
                if process.poll() is not None:
                    raise RedisNotAvailable(
                        f"redis-server exited at start-up (code {process.returncode}): "
                        f"{log_path.read_text(errors='replace')[-1000:]}"
                    )
                await trio.sleep(0.05)
            ready = True
        if not ready:
            raise RedisNotAvailable(f"redis-server did not answer within {START_TIMEOUT_SECONDS:.0f}s")
        yield RedisServer(f"redis://127.0.0.1:{port}/0", port, process.pid)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(5):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def server_command(binary: str, port: int, directory: Path) -> list[str]:
    """`redis-server` on 127.0.0.1:`port`, in the foreground, writing nothing to disk but its log
    (no RDB snapshots, no AOF): a throw-away server for a run or a test."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
    ]


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def command_calls(port: int) -> dict[str, int]:
    """`INFO commandstats` as {command: calls} (lower case; subcommands as `script|load`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        reader = sock.makefile("rb")
        header = reader.readline()
        if not header.startswith(b"$"):
            raise RedisNotAvailable(f"unexpected answer to INFO: {header[:80]!r}")
        body = reader.read(int(header[1:]) + 2).decode()
    calls: dict[str, int] = {}
    for line in body.splitlines():
        name, _, stats = line.partition(":")
        if not name.startswith("cmdstat_"):
            continue
        fields = dict(part.split("=", 1) for part in stats.split(",") if "=" in part)
        calls[name.removeprefix("cmdstat_")] = int(fields.get("calls", 0))
    return calls
