"""Marks deliveries `sending` in the ledger just before their provider calls, many per write.

Every sender task of a run hands its message here and waits; the marker writes whatever has
queued up meanwhile in one round trip (group commit), so the write rate follows the store's
latency, not the message rate, and after a crash at most the deliveries in flight are left
with an unknown outcome.
"""

from __future__ import annotations

import trio
from trio import MemoryReceiveChannel

from dispatcher.errors import StoreError
from dispatcher.journal import Unrecorded
from dispatcher.messages import Message


class Mark:
    """One sender's request; `claimed` is False when another run holds the delivery."""

    __slots__ = ("message", "done", "claimed")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.done = trio.Event()
        self.claimed = False



async def mark(requests: MemoryReceiveChannel[Mark], journal: Unrecorded) -> None:
    with requests:
        async for first in requests:
            batch = [first]
            while True:
                try:
                    batch.append(requests.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            taken: set[tuple[str, str]] = set()
            if journal.fault is None:
                try:
                    taken = await journal.sending([(m.message.channel, m.message.user_id) for m in batch])
                except StoreError as exc:
                    journal.stop(exc)  # the senders see the fault and do not call the provider
            for request in batch:
                key = (request.message.channel, request.message.user_id)
                request.claimed = journal.fault is None and key not in taken
                request.done.set()
