"""Reads the selected users from the store once per send and hands every batch to every lane,
then the requested ids that matched no user."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from .backlog import Backlog
from .faults import StoreFault
from .journal import Unrecorded
from .messages import Delivery, User
from .ports import UserSource


@dataclass(frozen=True, slots=True)
class UnknownRecipient:
    user_id: str


class Unmatched:
    """The requested ids that no selected user had, in request order (reported `user not found`)."""

    def __init__(self, recipients: Iterable[str]) -> None:
        self._missing = dict.fromkeys(recipients)

    def saw(self, user_ids: Iterable[str]) -> None:
        if self._missing:
            for user_id in user_ids:
                self._missing.pop(user_id, None)

    def ids(self) -> list[str]:
        return list(self._missing)


def not_found(user_id: str, channel: str) -> Delivery:
    """The outcome of a requested id that matched no user, on one channel."""
    return Delivery(user_id, channel, "failed", "user not found", user_found=False, kind="not_found")


Batch = list[User | UnknownRecipient]


async def resolve(
    lanes: Sequence[Backlog[Batch]],
    store: UserSource,
    recipients: Sequence[str],
    clusters: Sequence[str],
    journal: Unrecorded,
) -> None:
    """Users travel in the store's batches: one hop per batch, not per user. The resolver goes
    at the pace of the fastest lane: it reads the next batch once some lane has room for it, and
    a lane that is behind keeps what it has not taken in its backlog (on disk past a batch), so a
    slow lane neither holds the others back nor fills memory. A store failure stops the stream
    (what was read is still delivered) and is left on the journal."""
    try:
        missing = Unmatched(recipients)
        try:
            async for batch in store.stream_users(recipients, clusters):
                if journal.halted:
                    return
                missing.saw(store.user_id(user) for user in batch)
                await _room(lanes)
                for lane in lanes:
                    lane.put(list(batch))
        except StoreFault as exc:
            journal.stop(exc)
            return
        unknown = missing.ids()
        if unknown and not journal.halted:
            await _room(lanes)
            for lane in lanes:
                lane.put([UnknownRecipient(user_id) for user_id in unknown])
    finally:
        for lane in lanes:
            lane.close()


async def _room(lanes: Sequence[Backlog[Batch]]) -> None:
    """Wait until some lane has room for a batch in memory."""
    while not any(lane.has_room for lane in lanes):
        # The events are taken now: a change between here and the tasks starting is not missed.
        changes = [lane.changed for lane in lanes]
        async with trio.open_nursery() as nursery:
            for change in changes:
                nursery.start_soon(_first, change, nursery.cancel_scope)


async def _first(change: trio.Event, scope: trio.CancelScope) -> None:
    await change.wait()
    scope.cancel()
