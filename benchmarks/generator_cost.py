"""What the load generator itself costs: client CPU per request of httpx (the harness's generator
until this round) and of the harness's bare connection (`dispatcher/loadtest/connection.py`),
driving the same small JSON POST at the same server, interleaved A/B.

    python benchmarks/generator_cost.py --requests 3000 --rounds 3

The server is a separate process (a Quart-Trio app on hypercorn answering a small JSON body, the
framework floor), so the figure is the generator's alone: this process's CPU time over the
requests, divided by their number. Target of issue 20: <= 0.2 ms per request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from types import SimpleNamespace

import httpx
import trio

from dispatcher.embedded_store import free_port
from dispatcher.loadtest.connection import Connection
from dispatcher.loadtest.drivers import PhaseStatus, run_stream
from dispatcher.loadtest.population import Population
from dispatcher.loadtest.service import ProcessService

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
    """The harness's own open loop (`run_stream`, `ProcessService.send`): request k due at
    start + k / rps, each waited for on its own, as in `dispatcher loadtest --scenario stream`.
    At a rate far below saturation every request wakes the loop by itself, which costs more per
    request than the closed loop above, where answers arrive together."""
    pool = [Connection("127.0.0.1", port, 10.0) for _ in range(clients)]
    service = ProcessService([], [], [pool], {})
    service.replicas = 1
    await service.send(PAYLOAD)  # connect before measuring
    options = SimpleNamespace(rps=rps, duration=n / rps, clients=clients, channels=("email",))
    env = SimpleNamespace(population=Population(100), tap=SimpleNamespace(mark=_no_mark))
    cpu = time.process_time()
    try:
        phase = await run_stream(service, env, options, PhaseStatus("stream"))  # type: ignore[arg-type]
    finally:
        used = time.process_time() - cpu
        for c in pool:
            c.close()
    assert all(e.reply.status == 200 for e in phase.exchanges), "a request failed"
    return used / len(phase.exchanges) * 1000


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
        if args.rps > 0:
            results[f"bare, open loop at {args.rps:g} req/s"] = []
        for _ in range(args.rounds):  # A, B, A, B: the machine's load drifts
            results["httpx"].append(trio.run(drive_httpx, port, args.requests, args.clients))
            results["bare"].append(trio.run(drive_bare, port, args.requests, args.clients))
            if args.rps > 0:
                cost = trio.run(drive_stream, port, args.requests, args.clients, args.rps)
                results[f"bare, open loop at {args.rps:g} req/s"].append(cost)
        for name, values in results.items():
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(f"{name:6} client CPU per request: median {statistics.median(values):.3f} ms  ({shown})")
        print(f"ratio bare/httpx: {statistics.median(results['bare']) / statistics.median(results['httpx']):.2f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
