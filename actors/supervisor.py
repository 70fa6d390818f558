"""Wires one send: a lane (resolver -> renderer -> sender) per channel, and one collector.

Each channel gets its own lane so that a slow channel (SMS at 1/s) paces only itself; the lanes
share nothing but the collector's inbox. Every channel between actors is bounded, so a slow
sender pushes back on its renderer and resolver instead of filling memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from dispatcher.messages import Delivery, Message, User
from dispatcher.models import SendResult
from dispatcher.plan import RequestPlan
from dispatcher.delivery import Transport
from dispatcher.store import Store

from .collector import collect
from .renderer import render
from .resolver import UnknownRecipient, resolve
from .sender import send


async def run_pipeline(plan: RequestPlan, store: Store, transports: Mapping[str, Transport],
                       queue_size: int) -> SendResult:
    request = plan.request
    result: SendResult | None = None
    results_in, results_out = trio.open_memory_channel[Delivery](queue_size)

    async def collector() -> None:
        nonlocal result
        result = await collect(results_out, [lane.channel for lane in plan.channels])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collector)
        with results_in:
            for lane in plan.channels:
                # Users travel in store batches, so a couple of batches in flight are plenty.
                users_in, users_out = trio.open_memory_channel[list[User | UnknownRecipient]](2)
                messages_in, messages_out = trio.open_memory_channel[Message](queue_size)
                nursery.start_soon(resolve, users_in, store, request.recipients, request.clusters)
                nursery.start_soon(render, users_out, messages_in, results_in.clone(), lane, request.data)
                nursery.start_soon(send, messages_out, results_in.clone(), transports[lane.channel])
    assert result is not None
    return result
