"""Delivers one channel's messages, at most the channel's concurrency at a time for this send."""

from __future__ import annotations

from contextlib import nullcontext

import trio
from trio import MemoryReceiveChannel, MemorySendChannel

from dispatcher.delivery import Transport, deliver
from dispatcher.journal import Unrecorded
from dispatcher.messages import Delivery, Message

from .marker import Mark


async def send(messages: MemoryReceiveChannel[Message], results: MemorySendChannel[Delivery],
               transport: Transport, journal: Unrecorded | None = None,
               marks: MemorySendChannel[Mark] | None = None) -> None:
    """`marks` (with a recording journal) is the marker's inbox: each message is marked
    `sending` there before its provider call."""
    # One task per message, started only when a slot is free: a one-recipient send costs one task,
    # not a pool of idle workers. The channel's limiter inside `deliver` is process-wide, so
    # concurrent sends share the provider's allowance.
    slots = trio.Semaphore(int(transport.gate.limiter.total_tokens))
    journal = journal or Unrecorded()

    async def deliver_one(message: Message) -> None:
        try:
            if marks is not None:
                mark = Mark(message)
                await marks.send(mark)
                await mark.done.wait()
                if not mark.claimed:
                    # Store down (not marked, so not attempted: a resumed run sends it), or another
                    # run of this job holds the delivery: that run reports it.
                    return
            await results.send(await deliver(message, transport))
        finally:
            slots.release()

    # Closing `marks` with the rest: the marker ends once every sender has.
    with messages, results, marks if marks is not None else nullcontext():
        async with trio.open_nursery() as nursery:
            async for message in messages:
                await slots.acquire()
                if journal.cancelled:
                    slots.release()
                    await results.send(Delivery(message.user_id, message.channel, "cancelled"))
                    continue
                nursery.start_soon(deliver_one, message)
