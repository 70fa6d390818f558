"""Delivers one channel's messages, at most the channel's concurrency at a time for this send."""

from __future__ import annotations

import trio
from trio import MemoryReceiveChannel, MemorySendChannel

from .journal import Unrecorded
from .messages import Delivery, Message
from .ports import Transport


async def send(
    messages: MemoryReceiveChannel[Message],
    results: MemorySendChannel[Delivery],
    transport: Transport,
    journal: Unrecorded | None = None,
) -> None:
    """With a recording journal, each message is claimed `sending` in the ledger once it holds its
    slot and token, just before its provider call, and its outcome written right after (`Transport.deliver`;
    the ledger writes what every concurrent task asks in one round trip). A cancel of the run ends
    every wait before a provider call at once."""
    # One task per message, started only when a slot is free: a one-recipient send costs one task,
    # not a pool of idle workers. The channel's limiter inside `deliver` is process-wide, so
    # concurrent sends share the provider's allowance.
    slots = trio.Semaphore(transport.concurrency)
    journal = journal or Unrecorded()

    async def deliver_one(message: Message) -> None:
        try:
            # None: not attempted here: the store is down (not claimed, so not attempted: a resumed
            # run sends it), or another run of this job holds the delivery (that run reports it).
            delivery = await transport.deliver(message, journal)
            if delivery is not None:
                await results.send(delivery)
        finally:
            slots.release()

    with messages, results:
        async with trio.open_nursery() as nursery:
            async for message in messages:
                held = await journal.take(slots.acquire_nowait, slots.acquire)
                if journal.halted:
                    if held:
                        slots.release()
                    if (unattempted := journal.unattempted(message)) is not None:
                        await results.send(unattempted)
                    continue
                nursery.start_soon(deliver_one, message)
