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

MarkRequest = tuple[Message, trio.Event]


async def mark(requests: MemoryReceiveChannel[MarkRequest], journal: Unrecorded) -> None:
    with requests:
        async for first in requests:
            batch = [first]
            while True:
                try:
                    batch.append(requests.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if journal.fault is None:
                try:
                    await journal.sending([(message.channel, message.user_id) for message, _ in batch])
                except StoreError as exc:
                    journal.stop(exc)  # the senders see the fault and do not call the provider
            for _, marked in batch:
                marked.set()
