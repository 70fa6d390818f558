"""The scenarios: what is sent to the service, when, and what came back.

- fanout: one `POST /send` to the whole `loadtest` cluster on the selected channels (to the
  first replica: in cluster mode the service shares a fan-out among all its processes itself).
- stream: single-recipient, single-channel sends offered at a fixed rate for a duration,
  open-loop: request k is due at `start + k / rps` whatever happened to the earlier ones, and its
  latency runs from that due time, so a slow service cannot hide its queueing (no coordinated
  omission). At most `clients` requests are in flight; a request waiting for a client is late,
  and that shows in its latency. Request k goes to replica k mod N (the harness's round robin).

A stream to service processes runs in a generator process of its own (`open_loop.py`, no Trio:
a Trio loop woken from idle for each request cost twice issue 20's CPU budget per request); the
harness hands it every request encoded, then turns its outcomes into exchanges on the harness's
clock, decoding the answers' JSON after the run. The display's request count follows the
generator's progress reports, once a second. An embedded service is called in this process, from
`clients` Trio tasks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from .connection import encode_request
from .environment import Environment
from .open_loop import Plan, run_open_loop
from .options import LoadTestOptions
from .population import CLUSTER, Population
from .service import ProcessService, Reply, RunningService, reply_of

TITLE = "Hello {{ user.name }}"
CONTENT = "Hi {{ user.name }}, your load-test code is {{ data.code }}."
DATA = {"code": "LT-2026"}


def fanout_payload(channels: tuple[str, ...]) -> dict[str, Any]:
    return {
        "channels": list(channels),
        "clusters": [CLUSTER],
        "messageTitle": TITLE,
        "messageContent": CONTENT,
        "data": DATA,
    }


def single_payload(channel: str, user_id: str) -> dict[str, Any]:
    return {
        "channels": [channel],
        "recipients": [user_id],
        "messageTitle": TITLE,
        "messageContent": CONTENT,
        "data": DATA,
    }


@dataclass
class PhaseStatus:
    """What the progress display shows about the running phase."""

    name: str
    started: float = 0.0
    requests_total: int = 0
    requests_done: int = 0
    request_errors: int = 0


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request: for stream, the one channel and user it named (None for a fanout)."""

    channel: str | None
    user_index: int | None
    scheduled: float
    started: float
    finished: float
    reply: Reply
    replica: int = 0

    @property
    def latency(self) -> float:
        return self.finished - self.scheduled

    @property
    def ok(self) -> bool:
        return self.reply.status == 200 and self.reply.body is not None


@dataclass
class Phase:
    """One measured stretch: its Trio-clock span, the receipt counts at its start, its requests,
    and the CPU-seconds of the generator process that sent them (None: the harness sent them)."""

    name: str
    start: float
    end: float = 0.0
    mark: dict[str, int] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    generator_cpu: float | None = None


async def run_fanout(service: RunningService, env: Environment, status: PhaseStatus) -> Phase:
    status.requests_total = 1
    mark = await env.tap.mark()
    phase = Phase("fanout", trio.current_time(), mark=mark)
    status.started = phase.start
    reply = await service.send(fanout_payload(env.options.channels))
    phase.end = trio.current_time()
    phase.exchanges.append(Exchange(None, None, phase.start, phase.start, phase.end, reply))
    status.requests_done = 1
    status.request_errors = 0 if reply.status == 200 else 1
    return phase


def stream_targets(population: Population, channels: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    """(channel, user index) forever: channels in turn, each walking the users that have an
    address on it, wrapping around the population."""
    # User 0 has an address on every channel, so each walk finds one.
    cursors = dict.fromkeys(channels, 0)
    while True:
        for channel in channels:
            for _ in range(population.size):
                index = cursors[channel] % population.size
                cursors[channel] += 1
                if population.addresses(index, channel):
                    yield channel, index
                    break


async def run_stream(service: RunningService, env: Environment, options: LoadTestOptions, status: PhaseStatus) -> Phase:
    if isinstance(service, ProcessService):
        return await stream_from_generator(service, env, options, status)
    return await stream_from_harness(service, env, options, status)


def _total(options: LoadTestOptions) -> int:
    return max(1, round(options.rps * options.duration))


async def stream_from_generator(
    service: ProcessService, env: Environment, options: LoadTestOptions, status: PhaseStatus
) -> Phase:
    """The stream sent by the open-loop generator process; the phase starts when its clock does."""
    total = status.requests_total = _total(options)
    targets = list(itertools.islice(stream_targets(env.population, options.channels), total))
    hosts = [f"{host}:{port}" for host, port in service.addresses]
    requests = [
        encode_request("POST", "/send", hosts[k % len(hosts)], single_payload(channel, env.population.user_id(index)))
        for k, (channel, index) in enumerate(targets)
    ]
    mark = await env.tap.mark()
    status.started = trio.current_time()

    def progress(done: int, errors: int) -> None:
        status.requests_done, status.request_errors = done, errors

    plan = Plan(service.addresses, requests, options.rps, options.clients, options.request_timeout)
    run = await run_open_loop(plan, progress)
    # Both clocks are CLOCK_MONOTONIC, Trio's with an offset of its own.
    start = run.start + trio.current_time() - time.monotonic()
    phase = Phase("stream", start, start + run.elapsed, mark, generator_cpu=run.cpu)
    for o in run.outcomes:
        reply = reply_of(o.status, o.answer) if isinstance(o.answer, bytes) else Reply(0, None, o.answer)
        channel, index = targets[o.k]
        phase.exchanges.append(
            Exchange(channel, index, start + o.due, start + o.started, start + o.finished, reply, o.replica)
        )
    return phase


async def stream_from_harness(
    service: RunningService, env: Environment, options: LoadTestOptions, status: PhaseStatus
) -> Phase:
    """The stream sent from this process's Trio loop."""
    total = _total(options)
    status.requests_total = total
    targets = stream_targets(env.population, options.channels)
    mark = await env.tap.mark()
    phase = Phase("stream", trio.current_time(), mark=mark)
    status.started = phase.start
    taken = 0

    # `clients` tasks, each taking the next request in order, waiting for its due time if it is
    # not yet due, and sending it: at most `clients` in flight, and a request due while all are
    # busy goes when one is free, late, its latency counted from its due time. (A task and a
    # capacity limiter per request did the same with two more wake-ups of the loop each.)
    async def client() -> None:
        nonlocal taken
        while taken < total:
            k, taken = taken, taken + 1
            channel, index = next(targets)
            due = phase.start + k / options.rps
            if due > trio.current_time():
                await trio.sleep_until(due)
            started = trio.current_time()
            reply = await service.send(single_payload(channel, env.population.user_id(index)), k % service.replicas)
            finished = trio.current_time()
            phase.exchanges.append(Exchange(channel, index, due, started, finished, reply, k % service.replicas))
            status.requests_done += 1
            if reply.status != 200:
                status.request_errors += 1

    async with trio.open_nursery() as nursery:
        for _ in range(min(options.clients, total)):
            nursery.start_soon(client)
    phase.end = trio.current_time()
    return phase
