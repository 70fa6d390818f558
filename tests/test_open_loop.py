"""The stream's open-loop generator process (`dispatcher/loadtest/open_loop.py`), run for real
against small HTTP servers on 127.0.0.1 that record what reached them. Timing is asserted by
structure (due offsets, order, overlap), never by wall-clock figures."""

from __future__ import annotations

import dataclasses

import json
import os
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import trio

from dispatcher.children import python_environment
from dispatcher.loadtest.connection import encode_request
from dispatcher.loadtest.open_loop import Plan, Run, run_open_loop, write_plan


@dataclass
class Received:
    connection: int
    path: str
    body: bytes


@dataclass
class Recorder:
    """What one server received, on how many connections, and how many requests it held at once
    at most (counted from reading a request to starting its answer: never more than the client
    had in flight)."""

    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    working: int = 0
    most_working: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(socketserver.StreamRequestHandler):
    """Reads HTTP/1.1 requests with a content-length and answers by path: `/send` echoes the body
    (200), `/slow` too after 50 ms, `/status/N` answers N, `/close` answers `connection: close`
    but reads on (a client that ignored it would send the next request there), `/bye` answers
    then closes (as a keep-alive timeout does), `/drop` closes without an answer, `/chunked`
    answers chunked, `/silent` never answers."""

    server: _Server

    def handle(self) -> None:
        recorder = self.server.recorder
        with recorder.lock:
            recorder.connections += 1
            number = recorder.connections
        while self._one(number, recorder):
            pass

    def _one(self, number: int, recorder: Recorder) -> bool:
        line = self.rfile.readline()
        if not line:
            return False
        path = line.split()[1].decode()
        length = 0
        while (header := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = self.rfile.read(length)
        with recorder.lock:
            recorder.requests.append(Received(number, path, body))
        if path == "/slow":
            with recorder.lock:
                recorder.working += 1
                recorder.most_working = max(recorder.most_working, recorder.working)
            time.sleep(0.05)
            with recorder.lock:
                recorder.working -= 1
        if path == "/drop":
            return False
        if path == "/silent":
            return self._one(number, recorder)  # the client gives up and closes: readline ends
        if path == "/chunked":
            self.wfile.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
            return True
        status = int(path.rsplit("/", 1)[1]) if path.startswith("/status/") else 200
        answer = body if status == 200 else json.dumps({"message": f"status {status}"}).encode()
        close = b"connection: close\r\n" if path == "/close" else b""
        self.wfile.write(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, len(answer), close, answer)
        )
        return path != "/bye"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.recorder = Recorder()


@pytest.fixture
def servers() -> Iterator[list[_Server]]:
    started = [_Server(), _Server()]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in started]
    for thread in threads:
        thread.start()
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def _plan(
    servers: list[_Server], paths: list[str], *, rps: float = 200.0, clients: int = 4, timeout: float = 10.0
) -> Plan:
    addresses = [s.server_address[:2] for s in servers]
    requests = [
        encode_request("POST", path, f"127.0.0.1:{addresses[k % len(servers)][1]}", {"k": k})
        for k, path in enumerate(paths)
    ]
    return Plan([(str(h), int(p)) for h, p in addresses], requests, rps, clients, timeout)


def _body(k: int) -> bytes:
    return json.dumps({"k": k}, separators=(",", ":")).encode()


async def _run(plan: Plan) -> tuple[Run, list[tuple[int, int]]]:
    reports: list[tuple[int, int]] = []
    run = await run_open_loop(plan, lambda done, errors: reports.append((done, errors)))
    assert [o.k for o in run.outcomes] == list(range(len(plan.requests)))
    return run, reports


async def test_every_request_arrives_once_in_order_on_its_replica(servers: list[_Server]) -> None:
    n = 40
    run, reports = await _run(_plan(servers, ["/send"] * n))

    assert all(o.status == 200 for o in run.outcomes)
    assert [o.answer for o in run.outcomes] == [_body(k) for k in range(n)]  # each its own answer
    assert reports[-1] == (n, 0)
    for replica, server in enumerate(servers):
        received = server.recorder.requests
        mine = [k for k in range(n) if k % 2 == replica]
        # Exactly the pre-encoded bodies of the requests k = replica mod 2, each once...
        assert sorted(r.body for r in received) == sorted(_body(k) for k in mine)
        # ... and, on each connection, in the order they were due.
        for number in {r.connection for r in received}:
            on_it = [json.loads(r.body)["k"] for r in received if r.connection == number]
            assert on_it == sorted(on_it)
        assert all(o.replica == replica for o in run.outcomes if o.k in mine)
    assert run.cpu > 0 and run.elapsed >= run.outcomes[-1].finished


async def test_requests_are_due_at_k_over_rps_and_never_start_early(servers: list[_Server]) -> None:
    rps = 300.0
    run, _ = await _run(_plan(servers[:1], ["/send"] * 30, rps=rps))

    for o in run.outcomes:
        assert o.due == o.k / rps
        assert o.due <= o.started <= o.finished


async def test_no_more_than_clients_in_flight_and_late_requests_wait_for_a_free_one(servers: list[_Server]) -> None:
    # 15 requests due within 15 ms, 3 clients, 50 ms answers: five turns of three.
    clients = 3
    run, _ = await _run(_plan(servers[:1], ["/slow"] * 15, rps=1000.0, clients=clients))

    assert all(o.status == 200 for o in run.outcomes)
    assert servers[0].recorder.most_working <= clients
    for o in run.outcomes:
        in_flight = sum(1 for p in run.outcomes if p.started <= o.started < p.finished)
        assert in_flight <= clients, o
    # The last one waited four turns for a client, and its due time stayed where it was.
    last = run.outcomes[-1]
    assert last.due == 14 / 1000.0 and last.started - last.due >= 4 * 0.05 - 0.015


def _fresh_connection_after(server: _Server, k: int) -> bool:
    by_k = {json.loads(r.body)["k"]: r.connection for r in server.recorder.requests}
    return by_k[k + 1] != by_k[k]


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/drop", "the server closed the connection before the answer ended"),
        ("/chunked", "transfer-encoding 'chunked' is not supported"),
        ("/silent", "no answer within 0.5s"),
    ],
)
async def test_a_failed_answer_is_an_error_and_the_next_request_goes_on_a_fresh_connection(
    servers: list[_Server], path: str, error: str
) -> None:
    paths = ["/send", "/send", path, "/send", "/send"]
    run, reports = await _run(_plan(servers[:1], paths, rps=100.0, clients=1, timeout=0.5))

    failed = run.outcomes[2]
    assert failed.status == 0 and isinstance(failed.answer, str) and error in failed.answer
    assert [o.status for o in run.outcomes] == [200, 200, 0, 200, 200]
    assert [o.answer for o in run.outcomes[3:]] == [_body(3), _body(4)]
    if path == "/silent":
        assert failed.finished - failed.started >= 0.5
    # Every request reached the server once; the one after the failure on a new connection.
    assert sorted(json.loads(r.body)["k"] for r in servers[0].recorder.requests) == list(range(5))
    assert _fresh_connection_after(servers[0], 2)
    assert not _fresh_connection_after(servers[0], 0)
    assert reports[-1] == (5, 1)


async def test_connection_close_is_honoured_without_an_error(servers: list[_Server]) -> None:
    run, _ = await _run(_plan(servers[:1], ["/send", "/close", "/send"], rps=10_000.0, clients=1))

    assert [o.status for o in run.outcomes] == [200, 200, 200]
    assert _fresh_connection_after(servers[0], 1) and not _fresh_connection_after(servers[0], 0)


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(servers: list[_Server]) -> None:
    # 200 ms between requests: the server's close reaches the idle connection before the next one.
    run, _ = await _run(_plan(servers[:1], ["/send", "/bye", "/send", "/send"], rps=5.0, clients=1))

    assert [o.status for o in run.outcomes] == [200, 200, 200, 200]
    assert _fresh_connection_after(servers[0], 1) and not _fresh_connection_after(servers[0], 2)


async def test_a_connection_idle_past_the_keep_alive_is_replaced_not_used(servers: list[_Server]) -> None:
    # 100 ms between requests: within a keep-alive of 1 s one connection serves them all; with a
    # keep-alive of 50 ms each goes on a new one (a server may be closing the idle one just then).
    plan = _plan(servers[:1], ["/send"] * 3, rps=10.0, clients=1)
    run, _ = await _run(dataclasses.replace(plan, keep_alive=1.0))
    assert [o.status for o in run.outcomes] == [200] * 3
    assert servers[0].recorder.connections == 1

    run, _ = await _run(dataclasses.replace(plan, keep_alive=0.05))
    assert [o.status for o in run.outcomes] == [200] * 3
    assert servers[0].recorder.connections == 1 + 3


async def test_a_non_2xx_answer_is_reported_with_its_status_and_body(servers: list[_Server]) -> None:
    run, reports = await _run(_plan(servers[:1], ["/send", "/status/503", "/status/400", "/send"], clients=1))

    assert [o.status for o in run.outcomes] == [200, 503, 400, 200]
    assert json.loads(run.outcomes[1].answer) == {"message": "status 503"}
    assert servers[0].recorder.connections == 1  # an error status is an answer: the connection stays
    assert reports[-1] == (4, 2)


async def test_a_refused_connection_is_an_error_for_that_request() -> None:
    from dispatcher.embedded_store import free_port

    port = free_port()
    plan = Plan([("127.0.0.1", port)], [encode_request("POST", "/send", f"127.0.0.1:{port}", {})] * 3, 100.0, 2, 5.0)
    run, _ = await _run(plan)

    assert all(o.status == 0 and "ConnectionRefusedError" in str(o.answer) for o in run.outcomes)


def _generators() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "dispatcher.loadtest.open_loop" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
    ]


async def test_a_cancelled_run_kills_the_generator(servers: list[_Server]) -> None:
    # A long plan, cancelled once its first answers came: nothing of it may keep running.
    reports: list[tuple[int, int]] = []
    plan = _plan(servers[:1], ["/send"] * 10_000, rps=20.0)
    with trio.move_on_after(30) as waiting:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_open_loop, plan, lambda done, errors: reports.append((done, errors)))
            while not reports:
                await trio.sleep(0.05)
            assert _generators()
            nursery.cancel_scope.cancel()
    assert not waiting.cancelled_caught
    assert _generators() == []


def test_the_generator_stops_when_its_harness_is_gone(servers: list[_Server], tmp_path: Path) -> None:
    plan_path, results_path = tmp_path / "plan", tmp_path / "results"
    write_plan(_plan(servers[:1], ["/send"] * 10_000, rps=20.0), plan_path)
    child = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.loadtest.open_loop", str(plan_path), str(results_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=python_environment(os.environ),
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline()  # a progress line: it is sending
    child.stdin.close()  # what a harness killed outright leaves behind
    try:
        assert child.wait(timeout=30) != 0
        assert child.stderr is not None and b"the harness is gone" in child.stderr.read()
    finally:
        child.kill()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    assert not results_path.exists()
