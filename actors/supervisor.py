"""Wires one send: one resolver, a lane (renderer -> sender) per channel, and one collector.

The resolver reads each selected user once and hands the batch to every lane's backlog. Each
channel gets its own lane so that a slow channel (SMS at 1/s) paces only itself: the lanes share
nothing but the resolver's batches, the collector's inbox and the run's journal. Every channel
between actors is bounded and a lane's backlog keeps one batch in memory (the rest on disk), so a
slow sender pushes back on its renderer, and the resolver follows the fastest lane, without
filling memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from .backlog import Backlog
from .collector import collect, count, record
from .faults import StoreFault
from .journal import Unrecorded
from .messages import Delivery, Message, SendResult
from .ports import Metrics, Plan, RenderJobs, Transport, Unobserved, UserSource, render_inline
from .renderer import render, render_chunk, unsettled
from .resolver import Batch, UnknownRecipient, Unmatched, resolve
from .sender import send


async def run_pipeline(
    plan: Plan,
    store: UserSource,
    transports: Mapping[str, Transport],
    queue_size: int,
    result: SendResult | None = None,
    journal: Unrecorded | None = None,
    render_jobs: RenderJobs = render_inline,
    metrics: Metrics | None = None,
) -> SendResult:
    """Deliver `plan`, filling `result` as outcomes arrive (pass your own to keep what was
    attempted if this is cancelled). When it returns, every delivery that was started has ended;
    `journal.fault` tells whether a store failure stopped it early. `render_jobs` renders a
    chunk of users (the dispatcher passes `render_pool.RenderPool.render_users`, which renders
    what can run away in worker processes under a budget; the default renders inline, without
    one)."""
    request = plan.request
    result = SendResult() if result is None else result
    journal = journal or Unrecorded()
    metrics = metrics or Unobserved()
    if len(request.recipients) == 1 and not request.clusters and len(plan.channels) == 1:
        await _run_one(plan, store, transports, result, journal, render_jobs, metrics)
        return result
    results_send, results_receive = trio.open_memory_channel[Delivery](queue_size)
    async with trio.open_nursery() as nursery:
        providers = {lane.channel: transports[lane.channel].provider_name for lane in plan.channels}
        nursery.start_soon(collect, results_receive, result, providers, journal, metrics)
        metrics.track_queue("collect", results_receive)
        with results_send:
            backlogs = []
            for lane in plan.channels:
                # Users travel in store batches: one in the backlog's memory, one handed over.
                backlog = Backlog[Batch](in_memory=1)
                backlogs.append(backlog)
                users_send, users_receive = trio.open_memory_channel[Batch](0)
                messages_send, messages_receive = trio.open_memory_channel[Message](queue_size)
                metrics.track_queue("send", messages_receive)
                metrics.track_queue("render", backlog)
                nursery.start_soon(_hand_over, backlog, users_send)
                nursery.start_soon(
                    render, users_receive, messages_send, results_send.clone(), lane, request.data, journal, render_jobs
                )
                nursery.start_soon(send, messages_receive, results_send.clone(), transports[lane.channel], journal)
            nursery.start_soon(resolve, backlogs, store, request.recipients, request.clusters, journal)
    return result


async def _run_one(
    plan: Plan,
    store: UserSource,
    transports: Mapping[str, Transport],
    result: SendResult,
    journal: Unrecorded,
    render_jobs: RenderJobs,
    metrics: Metrics,
) -> None:
    """A send to one named user on one channel: the pipeline's stages, in order, in this task.
    With one message there is nothing to pace or overlap, and the actors' tasks and channels
    would be most of such a send's cost on the event loop (~0.3 ms: docs/benchmarks.md P)."""
    lane = plan.channels[0]
    transport = transports[lane.channel]
    users: Batch = []
    missing = Unmatched(plan.request.recipients)
    try:
        async for batch in store.stream_users(plan.request.recipients, ()):
            missing.saw(store.user_id(user) for user in batch)
            users.extend(batch)
    except StoreFault as exc:
        journal.stop(exc)
    if journal.halted:
        return
    users += [UnknownRecipient(user_id) for user_id in missing.ids()]
    split = await unsettled(users, lane, journal)
    if split is None:
        return
    settled, pending = split
    outcomes: list[Message | Delivery] = list(settled)
    if pending:
        outcomes += await render_chunk(render_jobs, pending, lane, plan.request.data, [])
    providers = {lane.channel: transport.provider_name}
    for outcome in outcomes:
        delivery: Delivery | None
        if not isinstance(outcome, Message):
            delivery = outcome
        elif journal.halted:
            delivery = journal.unattempted(outcome)
        else:
            delivery = await transport.deliver(outcome, journal)
        if delivery is not None:
            count(delivery, result, providers, metrics, lane.channel)
            await record([delivery], journal)


async def _hand_over(backlog: Backlog[Batch], out: trio.MemorySendChannel[Batch]) -> None:
    """Feed a lane's renderer from its backlog, oldest batch first."""
    try:
        with out:
            while (batch := await backlog.get()) is not None:
                await out.send(batch)
    finally:
        backlog.discard()
