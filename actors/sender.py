"""Delivers one channel's messages, at most the channel's concurrency at a time for this send."""

from __future__ import annotations

import trio
from trio import MemoryReceiveChannel, MemorySendChannel

from dispatcher.delivery import Transport, deliver
from dispatcher.errors import StoreError
from dispatcher.journal import Unrecorded
from dispatcher.messages import Delivery, Message


async def send(
    messages: MemoryReceiveChannel[Message],
    results: MemorySendChannel[Delivery],
    transport: Transport,
    journal: Unrecorded | None = None,
) -> None:
    """With a recording journal, each message is marked `sending` in the ledger just before its
    provider call (the ledger writes the marks of every concurrent task in one round trip)."""
    # One task per message, started only when a slot is free: a one-recipient send costs one task,
    # not a pool of idle workers. The channel's limiter inside `deliver` is process-wide, so
    # concurrent sends share the provider's allowance.
    slots = trio.Semaphore(int(transport.gate.limiter.total_tokens))
    journal = journal or Unrecorded()

    async def deliver_one(message: Message) -> None:
        try:
            # Not claimed: the store is down (not marked, so not attempted: a resumed run sends
            # it), or another run of this job holds the delivery (that run reports it).
            if await _claimed(message, journal):
                since = journal.reconcile_since(message.channel, message.user_id)
                await results.send(await deliver(message, transport, since))
        finally:
            slots.release()

    with messages, results:
        async with trio.open_nursery() as nursery:
            async for message in messages:
                await slots.acquire()
                if journal.cancelled:
                    slots.release()
                    await results.send(Delivery(message.user_id, message.channel, "cancelled"))
                    continue
                nursery.start_soon(deliver_one, message)


async def _claimed(message: Message, journal: Unrecorded) -> bool:
    if journal.fault is not None:
        return False
    try:
        taken = await journal.sending([(message.channel, message.user_id)])
    except StoreError as exc:
        journal.stop(exc)  # every sender of the run sees the fault and stops calling providers
        return False
    return journal.fault is None and not taken
