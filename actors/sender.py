"""Delivers one channel's messages, at most the channel's concurrency at a time for this send."""

from __future__ import annotations

import trio
from trio import MemoryReceiveChannel, MemorySendChannel

from dispatcher.delivery import Transport, deliver
from dispatcher.journal import Unrecorded
from dispatcher.messages import Delivery, Message


async def send(messages: MemoryReceiveChannel[Message], results: MemorySendChannel[Delivery],
               transport: Transport, journal: Unrecorded | None = None) -> None:
    # One task per message, started only when a slot is free: a one-recipient send costs one task,
    # not a pool of idle workers. The channel's limiter inside `deliver` is process-wide, so
    # concurrent sends share the provider's allowance.
    slots = trio.Semaphore(int(transport.gate.limiter.total_tokens))
    journal = journal or Unrecorded()

    async def deliver_one(message: Message) -> None:
        try:
            await results.send(await deliver(message, transport))
        finally:
            slots.release()

    with messages, results:
        async with trio.open_nursery() as nursery:
            async for message in messages:
                await slots.acquire()
                if journal.cancelled:
                    # Marked `sending` already: settle it as cancelled, not as unknown.
                    slots.release()
                    await results.send(Delivery(message.user_id, message.channel, "cancelled"))
                    continue
                nursery.start_soon(deliver_one, message)
