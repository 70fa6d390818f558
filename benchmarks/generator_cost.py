"""What the load generator itself costs: client CPU per request of httpx (the harness's generator
before issue 20), of the harness's bare connection (`dispatcher/loadtest/connection.py`) in a
closed loop and in the harness's own Trio open loop, and of the open-loop generator process
(`dispatcher/loadtest/open_loop.py`, the stream's generator now) at the same rate, driving the
same small JSON POST at the same server, interleaved round by round.

    python benchmarks/generator_cost.py --requests 3000 --rounds 3

The server is a separate process (a Quart-Trio app on hypercorn answering a small JSON body, the
framework floor), so the figure is the generator's alone: the CPU time of the process that sends,
over the requests, divided by their number. For the generator process that is its own measure
(from its first request's due time to its last answer); the harness's part of that run (writing
the plan, starting the process, decoding the answers) is the row after it. Target of issue 20:
<= 0.2 ms per request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import trio

from dispatcher.embedded_store import free_port
from dispatcher.loadtest.connection import Connection
from dispatcher.loadtest.drivers import PhaseStatus, stream_from_generator, stream_from_harness
from dispatcher.loadtest.population import Population
from dispatcher.loadtest.service import ProcessService, ServiceProcess

SERVER = """
import sys, trio
from quart_trio import QuartTrio
from hypercorn.config import Config
from hypercorn.trio import serve
app = QuartTrio("floor")
@app.post("/send")
async def send():
    from quart import request
    body = await request.get_json()
    return {"failures": [], "summary": {"users": len(body)}}
config = Config(); config.bind = [f"127.0.0.1:{sys.argv[1]}"]; config.accesslog = None
trio.run(serve, app, config)
"""

PAYLOAD = {"channels": ["email"], "recipients": ["u1"], "messageTitle": "Hi", "messageContent": "Hello {{user.name}}"}


async def drive_httpx(port: int, n: int, clients: int) -> float:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await _drive(lambda: client.post("/send", json=PAYLOAD), n, clients)


async def drive_bare(port: int, n: int, clients: int) -> float:
    pool = [Connection("127.0.0.1", port, 10.0) for _ in range(clients)]
    idle_in, idle_out = trio.open_memory_channel[Connection](clients)
    for c in pool:
        idle_in.send_nowait(c)

    async def one() -> None:
        c = await idle_out.receive()
        try:
            status, _ = await c.request("POST", "/send", PAYLOAD)
            assert status == 200, status
        finally:
            idle_in.send_nowait(c)

    try:
        return await _drive(one, n, clients)
    finally:
        for c in pool:
            c.close()


async def drive_stream(port: int, n: int, clients: int, rps: float) -> float:
    """The harness's own Trio open loop (`stream_from_harness`, `ProcessService.send`): request k
    due at start + k / rps, each waited for on its own, as `dispatcher loadtest --scenario stream`
    sent it before the generator process. At a rate far below saturation every request wakes the
    loop by itself, which costs more per request than the closed loop above, where answers arrive
    together."""
    pool = [Connection("127.0.0.1", port, 10.0) for _ in range(clients)]
    service = ProcessService([], [], [pool], {})
    service.replicas = 1
    await service.send(PAYLOAD)  # connect before measuring
    cpu = time.process_time()
    try:
        phase = await stream_from_harness(service, *_stream_setup(n, clients, rps))  # type: ignore[arg-type]
    finally:
        used = time.process_time() - cpu
        for c in pool:
            c.close()
    assert all(e.reply.status == 200 for e in phase.exchanges), "a request failed"
    return used / len(phase.exchanges) * 1000


async def drive_generator(port: int, n: int, clients: int, rps: float) -> tuple[float, float]:
    """The same open loop from the generator process (`stream_from_generator`, what
    `dispatcher loadtest --scenario stream` runs against service processes): (the process's CPU
    per request, this process's CPU per request over the same call)."""
    service = ProcessService([ServiceProcess([], {}, Path(), port)], [], [[]], {})
    cpu = time.process_time()
    phase = await stream_from_generator(service, *_stream_setup(n, clients, rps))  # type: ignore[arg-type]
    used = time.process_time() - cpu
    assert all(e.reply.status == 200 for e in phase.exchanges), "a request failed"
    assert phase.generator_cpu is not None
    return phase.generator_cpu / len(phase.exchanges) * 1000, used / len(phase.exchanges) * 1000


def _stream_setup(n: int, clients: int, rps: float) -> tuple[SimpleNamespace, SimpleNamespace, PhaseStatus]:
    options = SimpleNamespace(rps=rps, duration=n / rps, clients=clients, channels=("email",), request_timeout=10.0)
    env = SimpleNamespace(population=Population(100), tap=SimpleNamespace(mark=_no_mark))
    return env, options, PhaseStatus("stream")


async def _no_mark() -> dict[str, int]:
    return {}


async def _drive(call, n: int, clients: int) -> float:
    limiter = trio.Semaphore(clients)
    await call()  # connect before measuring
    cpu = time.process_time()

    async def one() -> None:
        try:
            await call()
        finally:
            limiter.release()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            await limiter.acquire()
            nursery.start_soon(one)
    return (time.process_time() - cpu) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--rps", type=float, default=100.0, help="the open loop's rate (the harness's stream); 0: closed loop only"
    )
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], env=os.environ.copy())
    try:
        for _ in range(100):
            try:
                httpx.post(f"http://127.0.0.1:{port}/send", json=PAYLOAD)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        results: dict[str, list[float]] = {"httpx": [], "bare": []}
        harness_loop = f"bare, harness's Trio open loop at {args.rps:g} req/s"
        generator = f"generator process, open loop at {args.rps:g} req/s"
        generator_harness = "  the harness's part of that run"
        if args.rps > 0:
            results.update({harness_loop: [], generator: [], generator_harness: []})
        for _ in range(args.rounds):  # A, B, A, B: the machine's load drifts
            results["httpx"].append(trio.run(drive_httpx, port, args.requests, args.clients))
            results["bare"].append(trio.run(drive_bare, port, args.requests, args.clients))
            if args.rps > 0:
                results[harness_loop].append(trio.run(drive_stream, port, args.requests, args.clients, args.rps))
                own, harness = trio.run(drive_generator, port, args.requests, args.clients, args.rps)
                results[generator].append(own)
                results[generator_harness].append(harness)
        width = max(len(name) for name in results)
        for name, values in results.items():
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(f"{name:{width}}  CPU per request: median {statistics.median(values):.3f} ms  ({shown})")
        print(f"ratio bare/httpx: {statistics.median(results['bare']) / statistics.median(results['httpx']):.2f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
