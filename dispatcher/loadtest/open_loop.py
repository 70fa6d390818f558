"""The stream scenario's open-loop generator, a process of its own that runs no Trio.

At a rate far below saturation (100 req/s) every request wakes an idle generator by itself, for
its due time and for its answer, and a wake-up of Trio's loop from idle costs ~0.2–0.3 ms of CPU
where a bare epoll loop's costs ~0.05–0.07 ms (`benchmarks/generator_cost.py`): the harness's own
loop spent 0.33–0.52 ms per request against issue 20's 0.2. This process runs a plain `selectors`
loop over non-blocking keep-alive sockets instead, and measures its own CPU time, which the
harness reports apart from its own.

It does what the harness's loop does (`drivers.py`): request k is due at start + k / rps on
`time.monotonic()`, goes to replica k mod N, at most `clients` are in flight, and one due while
all are busy starts when one is free, late (its latency still runs from its due time). A request
without an answer within `timeout` fails, and so does one whose connection broke; either closes
its connection, as does a `connection: close`, and the next request opens a new one. Requests
arrive encoded (`connection.encode_request`); answers are parsed as `connection.py` parses them
(`parse_head`: no chunked answer, no guess) and their bodies handed back raw: the harness decodes
the JSON after the run, not on this process's clock.

Between the harness (`run_open_loop`) and this process: a plan file and a results file, named on
argv (pickled builtins: written and read by this module only, in a directory of the harness's);
on stdout, a line `done errors` at most once a second (the harness's progress display) and once
at the end; stdin, which the harness holds open, and whose end stops this process (a harness
killed outright leaves no generator behind; `children.die_with_parent` would not do, as Trio
starts processes from a worker thread, whose exit fires the death signal); stderr, whose tail the
harness shows if it fails. The process's start-up (importing the package, ~0.5 s of CPU) comes
before its clock starts, and is in neither its CPU figure nor the harness's.
"""

from __future__ import annotations

import errno
import os
import pickle
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..children import python_environment
from ..errors import DispatcherError
from .connection import HEAD_END, MAX_HEAD, ExchangeError, failure_message, parse_head

PROGRESS_SECONDS = 1.0


class OpenLoopError(DispatcherError):
    """The generator process failed (its stderr says why)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send: `requests[k]` to `addresses[k % len(addresses)]` (host, port)."""

    addresses: Sequence[tuple[str, int]]
    requests: Sequence[bytes]
    rps: float
    clients: int
    timeout: float
    # A connection idle longer than this is closed rather than used: a server closes idle
    # keep-alive connections (hypercorn after 5 s), and a request written as its close is on the
    # way meets a reset. At a low rate the most recently used connections serve every request and
    # the others wait, idle, for a burst.
    keep_alive: float = 2.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request; times in seconds from the run's start. `answer`: the body, or what went wrong
    (then `status` is 0)."""

    k: int
    replica: int
    due: float
    started: float
    finished: float
    status: int
    answer: bytes | str


@dataclass(frozen=True, slots=True)
class Run:
    start: float  # time.monotonic() when request 0 was due
    elapsed: float  # from then until the last request ended
    cpu: float  # the generator's CPU-seconds over that span
    outcomes: list[Outcome]


async def run_open_loop(plan: Plan, progress: Callable[[int, int], None] | None = None) -> Run:
    """Run `plan` in a generator process and return its outcomes once every request ended;
    `progress(done, errors)` as the process reports them. Cancelled, it kills the process."""
    with tempfile.TemporaryDirectory(prefix="open-loop-") as scratch:
        plan_path, results_path, log_path = (Path(scratch) / n for n in ("plan", "results", "stderr"))
        await trio.to_thread.run_sync(write_plan, plan, plan_path)
        with open(log_path, "wb") as log:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", __name__, str(plan_path), str(results_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=python_environment(os.environ),
                # Out of the terminal's process group: a Ctrl-C reaches the harness, which kills this.
                start_new_session=True,
            )
        try:
            assert process.stdout is not None
            await _follow(process.stdout, progress)
            await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                for stream in (process.stdin, process.stdout):
                    if stream is not None:
                        await stream.aclose()
        if process.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise OpenLoopError(f"the open-loop generator failed (exit {process.returncode}):\n{tail}")
        raw = await trio.to_thread.run_sync(_load, results_path)
    return Run(raw["start"], raw["elapsed"], raw["cpu"], [Outcome(*row) for row in raw["outcomes"]])


async def _follow(stream: trio.abc.ReceiveStream, progress: Callable[[int, int], None] | None) -> None:
    buffer = b""
    while data := await stream.receive_some():
        *lines, buffer = (buffer + data).split(b"\n")
        if lines and progress is not None:
            done, errors = lines[-1].split()
            progress(int(done), int(errors))


def write_plan(plan: Plan, path: Path) -> None:
    """The plan file a generator process reads (`python -m dispatcher.loadtest.open_loop PLAN RESULTS`)."""
    spec = {
        "addresses": list(plan.addresses),
        "requests": list(plan.requests),
        "rps": plan.rps,
        "clients": plan.clients,
        "timeout": plan.timeout,
        "keep_alive": plan.keep_alive,
    }
    _dump(spec, path)


def _dump(value: Any, path: Path) -> None:
    with open(path, "wb") as file:
        pickle.dump(value, file, protocol=pickle.HIGHEST_PROTOCOL)


def _load(path: Path) -> Any:
    with open(path, "rb") as file:
        return pickle.load(file)


# The process's side. Per request it does the least it can: a send, a receive, the head parsed.


class _HarnessGone(Exception):
    pass


# An `Outcome`'s fields: plain builtins, for the results file.
_Row = tuple[int, int, float, float, float, int, bytes | str]


class _Connection:
    __slots__ = ("sock", "replica", "connecting", "pending", "buffer", "head", "k", "started", "idle_since")

    def __init__(self, sock: socket.socket, replica: int, connecting: bool) -> None:
        self.sock: socket.socket | None = sock
        self.replica = replica
        self.connecting = connecting
        self.pending: memoryview | bytes = b""  # what is still to be written
        self.buffer = bytearray()
        self.head: tuple[int, int, bool] | None = None  # of the answer being read
        self.k = -1  # the request in flight on it, if any
        self.started = 0.0
        self.idle_since = 0.0


class _Generator:
    def __init__(self, spec: dict[str, Any], stop_fd: int | None, progress_fd: int | None) -> None:
        self.requests: list[bytes] = spec["requests"]
        self.rps: float = spec["rps"]
        self.clients: int = spec["clients"]
        self.timeout: float = spec["timeout"]
        self.keep_alive: float = spec["keep_alive"]
        self.stop_fd, self.progress_fd = stop_fd, progress_fd
        # Resolved before the clock starts.
        self.addresses = [socket.getaddrinfo(h, p, type=socket.SOCK_STREAM)[0] for h, p in spec["addresses"]]
        self.selector = selectors.DefaultSelector()
        if stop_fd is not None:
            try:
                self.selector.register(stop_fd, selectors.EVENT_READ, None)
            except (OSError, ValueError):
                pass  # not a pipe (a file, /dev/null): nothing to watch
        self.idle: list[list[_Connection]] = [[] for _ in self.addresses]
        # (deadline, k, connection) in the order requests started, which is their deadlines' order.
        self.in_flight: deque[tuple[float, int, _Connection]] = deque()
        self.outcomes: list[_Row | None] = [None] * len(self.requests)
        self.start = 0.0
        self.busy = self.done = self.errors = 0

    def run(self) -> dict[str, Any]:
        total, clients, rps = len(self.requests), self.clients, self.rps
        selector, in_flight, outcomes = self.selector, self.in_flight, self.outcomes
        report = PROGRESS_SECONDS
        k = 0
        cpu = time.process_time()
        self.start = start = time.monotonic()
        while self.done < total:
            # Offsets from the start, compared as such: a request never starts before its due offset.
            now = time.monotonic() - start
            while k < total and self.busy < clients and k / rps <= now:
                self._send(k, now)
                k += 1
            wait: float | None = None
            while in_flight:
                deadline, j, connection = in_flight[0]
                if outcomes[j] is not None:
                    in_flight.popleft()
                elif deadline <= now:
                    in_flight.popleft()
                    self._finish(connection, 0, f"no answer within {self.timeout:g}s", keep=False)
                else:
                    wait = deadline - now
                    break
            if self.done >= total:
                break
            if k < total and self.busy < clients:
                until_due = k / rps - now
                wait = until_due if wait is None else min(wait, until_due)
            for key, events in selector.select(wait):
                connection = key.data
                if connection is None:
                    self._check_harness()
                    continue
                if events & selectors.EVENT_WRITE:
                    self._write(connection)
                if events & selectors.EVENT_READ and connection.sock is not None:  # the write may have failed
                    self._read(connection)
            if now >= report:
                self._progress()
                report = now + PROGRESS_SECONDS
        elapsed = time.monotonic() - start
        cpu = time.process_time() - cpu
        self._progress()
        for pool in self.idle:
            for connection in pool:
                self._close(connection)
        selector.close()
        return {"start": start, "elapsed": elapsed, "cpu": cpu, "outcomes": outcomes}

    def _send(self, k: int, now: float) -> None:
        replica = k % len(self.addresses)
        pool = self.idle[replica]
        try:
            # The most recently used first: at a low rate a few connections serve every request.
            connection = pool.pop() if pool else None
            if connection is not None and now - connection.idle_since > self.keep_alive:
                for stale in (connection, *pool):  # the others have been idle longer still
                    self._close(stale)
                pool.clear()
                connection = None
            if connection is None:
                connection = self._open(replica)
        except OSError as exc:
            self._record(k, replica, now, 0, failure_message(exc))
            return
        connection.k, connection.started = k, now
        self.busy += 1
        self.in_flight.append((now + self.timeout, k, connection))
        connection.pending = self.requests[k]
        if not connection.connecting:
            self._write(connection)

    def _open(self, replica: int) -> _Connection:
        family, kind, proto, _, address = self.addresses[replica]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
        except OSError:
            sock.close()
            raise
        connection = _Connection(sock, replica, connecting=code != 0)
        # Registered for reading as long as it is open: an idle connection the server closes is
        # noticed then, not by the next request sent on it.
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.connecting else 0)
        self.selector.register(sock, events, connection)
        return connection

    def _write(self, connection: _Connection) -> None:
        sock = connection.sock
        assert sock is not None
        try:
            if connection.connecting:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                connection.connecting = False
            pending = connection.pending
            sent = sock.send(pending)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._finish(connection, 0, failure_message(exc), keep=False)
            return
        if sent == len(pending):
            connection.pending = b""
            events = selectors.EVENT_READ
        else:
            connection.pending = memoryview(pending)[sent:]
            events = selectors.EVENT_READ | selectors.EVENT_WRITE
        if events != self.selector.get_key(sock).events:
            self.selector.modify(sock, events, connection)

    def _read(self, connection: _Connection) -> None:
        sock = connection.sock
        assert sock is not None
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            data, error = b"", failure_message(exc)
        else:
            error = "the server closed the connection before the answer ended"
        if connection.k < 0:  # idle: the server closed it, or sent what nobody asked for
            self.idle[connection.replica].remove(connection)
            self._close(connection)
            return
        if not data:
            self._finish(connection, 0, error, keep=False)
            return
        buffer = connection.buffer
        buffer += data
        if connection.head is None:
            end = buffer.find(HEAD_END)
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._finish(connection, 0, "answer head over 64 KiB", keep=False)
                return
            try:
                connection.head = parse_head(bytes(buffer[:end]))
            except (ExchangeError, ValueError) as exc:
                self._finish(connection, 0, failure_message(exc), keep=False)
                return
            del buffer[: end + 4]
        status, length, close = connection.head
        if len(buffer) < length:
            return
        # More than the answer: the server speaks out of turn; the connection is not trusted further.
        self._finish(connection, status, bytes(buffer[:length]), keep=not close and len(buffer) == length)

    def _finish(self, connection: _Connection, status: int, answer: bytes | str, keep: bool) -> None:
        self._record(connection.k, connection.replica, connection.started, status, answer)
        connection.k, connection.head = -1, None
        self.busy -= 1
        if keep:
            connection.buffer.clear()
            connection.idle_since = time.monotonic() - self.start
            self.idle[connection.replica].append(connection)
        else:
            self._close(connection)

    def _record(self, k: int, replica: int, started: float, status: int, answer: bytes | str) -> None:
        self.outcomes[k] = (k, replica, k / self.rps, started, time.monotonic() - self.start, status, answer)
        self.done += 1
        if status != 200:
            self.errors += 1

    def _close(self, connection: _Connection) -> None:
        sock, connection.sock = connection.sock, None
        if sock is not None:
            self.selector.unregister(sock)
            sock.close()

    def _progress(self) -> None:
        if self.progress_fd is not None:
            try:
                os.write(self.progress_fd, b"%d %d\n" % (self.done, self.errors))
            except BrokenPipeError:
                raise _HarnessGone() from None

    def _check_harness(self) -> None:
        assert self.stop_fd is not None
        if not os.read(self.stop_fd, 4096):
            raise _HarnessGone()


def main(argv: list[str] | None = None) -> None:
    plan_path, results_path = argv if argv is not None else sys.argv[1:]
    generator = _Generator(_load(Path(plan_path)), stop_fd=0, progress_fd=1)
    try:
        results = generator.run()
    except _HarnessGone:
        sys.exit("open-loop generator: the harness is gone; stopping")
    partial = Path(results_path + ".partial")
    _dump(results, partial)
    partial.replace(results_path)


if __name__ == "__main__":
    main()
