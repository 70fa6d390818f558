"""The service under test and its lifecycle: separate processes (`python -m dispatcher --config
<generated toml> serve --port P`, one per replica, each on its own port) or embedded in the
harness (`open_dispatcher`), behind one small `send` interface. A process can be SIGKILLed and
started again with the same command (`--kill-at`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
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
from ..web import status_of
from ..wire import send_result_json
from .connection import Connection, ExchangeError
from .config import child_environment, embedded_settings, service_config
from .environment import Environment
from .options import LoadTestOptions

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # where the service processes listen
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


def reply_of(status: int, raw: bytes) -> Reply:
    """The reply to an HTTP answer: a 2xx with a JSON body is a success; another status keeps its
    body and names its `message`."""
    try:
        body = json.loads(raw)
    except ValueError:
        return Reply(status, None, f"not JSON: {raw[:200]!r}")
    if not 200 <= status < 300:
        return Reply(status, body, str(body.get("message", body)) if isinstance(body, dict) else None)
    return Reply(status, body)


class RunningService(Protocol):
    mode: str
    generator: str
    memory_note: str
    config: dict[str, Any]
    replicas: int  # processes the harness addresses directly (each may have workers)

    @property
    def pid(self) -> int:
        """The (first) service process."""
        ...

    def roots(self) -> list[int]:
        """The service processes now (their workers are their children)."""
        ...

    async def send(self, payload: dict[str, Any], replica: int = 0) -> Reply: ...


class ServiceProcess:
    """One `dispatcher serve` process on its own port, started with the same command each time:
    `start` (returns once `/-/ready` answers), `kill` (SIGKILL: no drain, nothing flushed), `stop`
    (SIGTERM, then SIGKILL if it lingers)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, port: int) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.port = port
        self.process: trio.Process | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, http: httpx.AsyncClient) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = await trio.lowlevel.open_process(
                self.command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=self.env
            )
        self.starts += 1
        await _wait_ready(self.process, http, self.log_path)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process)


class ProcessService:
    """Drives service processes over HTTP, each a replica on its own port (`addresses`). The
    stream's requests go from a generator process of their own (`open_loop.py`); the harness's
    own (a fan-out) through its bare HTTP/1.1 client (`connection.py`: a tenth of httpx's CPU per
    request, which the service being measured would otherwise lose), a few keep-alive connections
    per replica. httpx stays for the control requests (readiness, metrics). Which replica serves a
    send is the caller's choice (the drivers go round-robin)."""

    mode = "process"
    generator = (
        "stream: open-loop process on selectors, no Trio (dispatcher/loadtest/open_loop.py); "
        "fan-out: bare HTTP/1.1 from the harness (dispatcher/loadtest/connection.py)"
    )

    def __init__(
        self,
        processes: list[ServiceProcess],
        clients: list[httpx.AsyncClient],
        connections: list[list[Connection]],
        config: dict[str, Any],
        workers: int | None = None,
    ) -> None:
        self.processes = processes
        self.config = config
        self.replicas = len(processes)
        self.memory_note = (
            "service process"
            if self.replicas == 1 and workers is None
            else "service processes, summed (supervisors and workers)"
        )
        self._control = clients
        self._idle = []
        for pool in connections:
            idle_in, idle_out = trio.open_memory_channel[Connection](len(pool))
            for connection in pool:
                idle_in.send_nowait(connection)
            self._idle.append((idle_in, idle_out))

    @property
    def pid(self) -> int:
        return self.processes[0].pid

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of each replica."""
        return [(HOST, process.port) for process in self.processes]

    def roots(self) -> list[int]:
        return [p.pid for p in self.processes if p.process is not None]

    async def request(self, method: str, path: str, payload: dict[str, Any] | None = None, replica: int = 0) -> Reply:
        """One HTTP exchange; a 2xx answer with a JSON body is a success."""
        idle_in, idle_out = self._idle[replica]
        try:  # without the checkpoint of `receive()`: one wake-up of the loop less per request
            connection = idle_out.receive_nowait()
        except trio.WouldBlock:
            connection = await idle_out.receive()
        try:
            status, raw = await connection.request(method, path, payload)
        except ExchangeError as exc:
            return Reply(0, None, str(exc))
        finally:
            idle_in.send_nowait(connection)
        return reply_of(status, raw)

    async def send(self, payload: dict[str, Any], replica: int = 0) -> Reply:
        return await self.request("POST", "/send", payload, replica)

    async def metric(self, name: str, replica: int = 0) -> float | None:
        """The sum of a metric's samples in the replica's `/-/metrics` (Prometheus text); None
        when it is not there (an older service, or protected metrics)."""
        try:
            response = await self._control[replica].get("/-/metrics", headers={"Accept": "text/plain"})
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in response.text.splitlines()
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
        ]
        return sum(values) if values else None

    async def restart(self, replica: int = 0) -> None:
        """Start a killed (or stopped) replica again, same command, same port."""
        await self.processes[replica].start(self._control[replica])


class EmbeddedService:
    mode = "embedded"
    generator = "in-process calls to Dispatcher.send"
    memory_note = "harness process, embedded mode"
    replicas = 1

    def __init__(self, instance: dispatcher.Dispatcher, config: dict[str, Any]) -> None:
        self._dispatcher = instance
        self.pid = os.getpid()
        self.config = config

    def roots(self) -> list[int]:
        return [self.pid]

    async def send(self, payload: dict[str, Any], replica: int = 0) -> Reply:
        try:
            result = await self._dispatcher.send(payload)
        except RequestError as exc:
            return Reply(status_of(exc), None, str(exc))
        except DispatcherError as exc:
            return Reply(500, None, f"{type(exc).__name__}: {exc}")
        return Reply(200, send_result_json(result))


@asynccontextmanager
async def open_service(
    options: LoadTestOptions,
    env: Environment,
    output: Path,
    command: Callable[[Path, int], list[str]] | None = None,
) -> AsyncIterator[RunningService]:
    """Start the service the way `options.mode` says and stop it when the block exits. `command`
    (config path, port -> argv) runs something else in the service's place on the same generated
    configuration: `benchmarks/floor.py` runs the floor of a send that way."""
    if options.mode == "embedded":
        config = service_config(options, env, port=0)
        async with dispatcher.open_dispatcher(embedded_settings(config, env)) as instance:
            yield EmbeddedService(instance, config)
        return
    ports = [free_port() for _ in range(options.replicas)]
    config = service_config(options, env, ports[0])
    embedded_settings(config, env)  # a ConfigError now, rather than a child that exits at start-up
    config_path = output / "service-config.toml"
    config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    extra: list[str] = []
    if options.workers is not None:
        if not await serve_has_workers(env):
            raise ServiceError(
                "--workers: this version of `dispatcher serve` has no --workers option; "
                "run without it (or use --replicas)"
            )
        extra = ["--workers", str(options.workers)]
    processes = [
        ServiceProcess(
            service_command(config_path, options.service_log_level, port, extra)
            if command is None
            else command(config_path, port),
            child_environment(env),
            _log_path(output, i, options.replicas),
            port,
        )
        for i, port in enumerate(ports)
    ]
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_stop_all, processes)
        timeout = httpx.Timeout(options.request_timeout, connect=10.0)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        tls = ssl.create_default_context()  # unused (plain HTTP); shared, since each one costs ~40 ms
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=timeout, limits=limits, verify=tls)
            )
            for port in ports
        ]
        # The harness's own requests only: a stream's go from the generator process.
        connections = [[Connection(HOST, port, options.request_timeout) for _ in range(2)] for port in ports]
        for pool in connections:
            for connection in pool:
                stack.callback(connection.close)
        if len(processes) == 1:
            await processes[0].start(clients[0])
        else:
            async with trio.open_nursery() as nursery:  # side by side: each takes a few seconds
                for process, client in zip(processes, clients):
                    nursery.start_soon(process.start, client)
        yield ProcessService(processes, clients, connections, config, options.workers)


def _log_path(output: Path, index: int, replicas: int) -> Path:
    return output / ("service.log" if replicas == 1 else f"service-{index + 1}.log")


async def _stop_all(processes: list[ServiceProcess]) -> None:
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for process in processes:
                nursery.start_soon(process.stop)


def service_command(
    config_path: Path, log_level: str, port: int | None = None, extra: list[str] | None = None
) -> list[str]:
    command = [sys.executable, "-m", "dispatcher", "--config", str(config_path), "--log-level", log_level, "serve"]
    if port is not None:
        command += ["--port", str(port)]
    return command + (extra or [])


_WORKERS_SUPPORTED: bool | None = None


async def serve_has_workers(env: Environment) -> bool:
    """Whether `dispatcher serve` takes `--workers` (the option is new; older versions lack it)."""
    global _WORKERS_SUPPORTED
    if _WORKERS_SUPPORTED is None:
        result = await trio.run_process(
            [sys.executable, "-m", "dispatcher", "serve", "--help"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=child_environment(env),
        )
        _WORKERS_SUPPORTED = b"--workers" in result.stdout
    return _WORKERS_SUPPORTED


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
                raise ServiceError(f"the service exited at start-up (code {process.returncode}):\n{_tail(log_path)}")
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
