"""Delivers one channel's messages with a fixed number of workers sharing the channel's gate."""

from __future__ import annotations

import trio
from trio import MemoryReceiveChannel, MemorySendChannel

from dispatcher.messages import Delivery, Message
from dispatcher.retry import Transport, deliver


async def send(messages: MemoryReceiveChannel[Message], results: MemorySendChannel[Delivery],
               transport: Transport, workers: int) -> None:
    # Workers beyond the channel's concurrency would only queue on its limiter; the limiter
    # itself is process-wide, so concurrent requests share the provider's allowance.
    async def worker(inbox: MemoryReceiveChannel[Message], outbox: MemorySendChannel[Delivery]) -> None:
        with inbox, outbox:
            async for message in inbox:
                await outbox.send(await deliver(message, transport))

    with messages, results:
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker, messages.clone(), results.clone())
