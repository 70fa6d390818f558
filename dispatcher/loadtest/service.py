"""The service under test and its lifecycle: a separate process (`python -m dispatcher --config
<generated toml> serve`) or embedded in the harness (`open_dispatcher`), behind one small `send`
interface."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import tomli_w
import trio

import dispatcher

from ..embedded_store import free_port
from ..errors import DispatcherError, RequestError
from .config import child_environment, embedded_settings, service_config
from .environment import Environment
from .options import LoadTestOptions

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0


class ServiceError(DispatcherError):
    """The service could not be started (its log says why)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one send: HTTP status (0 when none came) and JSON body, or what went wrong."""

    status: int
    body: dict[str, Any] | None
    error: str | None = None


class RunningService(Protocol):
    mode: str
    pid: int
    memory_note: str
    config: dict[str, Any]

    async def send(self, payload: dict[str, Any]) -> Reply: ...


class ProcessService:
    """Drives the service over HTTP with `len(clients)` keep-alive connections, one per
    `httpx.AsyncClient`: httpcore scans its whole pool for every request it queues, which made
    a single 64-connection client the harness's own bottleneck at a few hundred requests/s."""

    mode = "process"
    memory_note = "service process"

    def __init__(self, process: trio.Process, clients: list[httpx.AsyncClient], config: dict[str, Any]) -> None:
        self.process = process
        self.pid = process.pid
        self.config = config
        self._idle_in, self._idle_out = trio.open_memory_channel[httpx.AsyncClient](len(clients))
        for client in clients:
            self._idle_in.send_nowait(client)

    async def send(self, payload: dict[str, Any]) -> Reply:
        client = await self._idle_out.receive()
        try:
            response = await client.post("/send", json=payload)
        except httpx.HTTPError as exc:
            return Reply(0, None, f"{type(exc).__name__}: {exc}".rstrip(": "))
        finally:
            self._idle_in.send_nowait(client)
        try:
            body = response.json()
        except ValueError:
            return Reply(response.status_code, None, f"not JSON: {response.text[:200]!r}")
        if response.status_code != 200:
            return Reply(response.status_code, body, str(body.get("message", body)) if isinstance(body, dict) else None)
        return Reply(200, body)


class EmbeddedService:
    mode = "embedded"
    memory_note = "harness process, embedded mode"

    def __init__(self, instance: dispatcher.Dispatcher, config: dict[str, Any]) -> None:
        self._dispatcher = instance
        self.pid = os.getpid()
        self.config = config

    async def send(self, payload: dict[str, Any]) -> Reply:
        try:
            result = await self._dispatcher.send(payload)
        except RequestError as exc:
            return Reply(exc.status_code, None, str(exc))
        except DispatcherError as exc:
            return Reply(500, None, f"{type(exc).__name__}: {exc}")
        return Reply(200, result.to_json())


@asynccontextmanager
async def open_service(options: LoadTestOptions, env: Environment, output: Path) -> AsyncIterator[RunningService]:
    """Start the service the way `options.mode` says and stop it when the block exits."""
    if options.mode == "embedded":
        config = service_config(options, env, port=0)
        async with dispatcher.open_dispatcher(embedded_settings(config, env)) as instance:
            yield EmbeddedService(instance, config)
        return
    port = free_port()
    config = service_config(options, env, port)
    embedded_settings(config, env)  # a ConfigError now, rather than a child that exits at start-up
    config_path = output / "service-config.toml"
    config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    async with _service_process(options, env, config_path, output / "service.log") as process, \
            AsyncExitStack() as stack:
        timeout = httpx.Timeout(options.request_timeout, connect=10.0)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        tls = ssl.create_default_context()  # unused (plain HTTP); shared, since each one costs ~40 ms
        clients = [await stack.enter_async_context(httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=timeout, limits=limits, verify=tls))
            for _ in range(options.clients if options.scenario == "stream" else 1)]
        await _wait_ready(process, clients[0], output / "service.log")
        yield ProcessService(process, clients, config)


def service_command(config_path: Path, log_level: str) -> list[str]:
    return [sys.executable, "-m", "dispatcher", "--config", str(config_path), "--log-level", log_level, "serve"]


@asynccontextmanager
async def _service_process(options: LoadTestOptions, env: Environment, config_path: Path,
                           log_path: Path) -> AsyncIterator[trio.Process]:
    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            service_command(config_path, options.service_log_level), stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=log_file, env=child_environment(env))
        try:
            yield process
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(process)


async def stop_process(process: trio.Process) -> None:
    """SIGTERM (the service drains and exits), then SIGKILL if it lingers."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT_SECONDS):
            await process.wait()
    if process.returncode is None:
        log.warning("process %d did not stop within %.0fs: killing it", process.pid, STOP_TIMEOUT_SECONDS)
        process.kill()
        await process.wait()


async def _wait_ready(process: trio.Process, http: httpx.AsyncClient, log_path: Path) -> None:
    # A separate process cannot hand us a readiness event: poll its readiness endpoint.
    with trio.move_on_after(READY_TIMEOUT_SECONDS):
        while True:
            if process.poll() is not None:
                raise ServiceError(f"the service exited at start-up (code {process.returncode}):\n"
                                   f"{_tail(log_path)}")
            try:
                response = await http.get("/-/ready", timeout=2.0)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.1)
    raise ServiceError(f"the service was not ready within {READY_TIMEOUT_SECONDS:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError:
        return "(no log)"
