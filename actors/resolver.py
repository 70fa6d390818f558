"""Streams the selected users from the store, each once, then the requested ids that matched none."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trio import MemorySendChannel

from .journal import Unrecorded
from .messages import User
from .faults import StoreFault
from .ports import UserSource


@dataclass(frozen=True, slots=True)
class UnknownRecipient:
    user_id: str


async def resolve(
    out: MemorySendChannel[list[User | UnknownRecipient]],
    store: UserSource,
    recipients: Sequence[str],
    clusters: Sequence[str],
    journal: Unrecorded,
) -> None:
    """Users travel in the store's batches: one channel hop per batch, not per user. A store
    failure stops the stream (what was read is still delivered) and is left on the journal."""
    with out:
        missing = dict.fromkeys(recipients)
        try:
            async for batch in store.stream_users(recipients, clusters):
                if journal.halted:
                    return
                if missing:
                    for user in batch:
                        missing.pop(store.user_id(user), None)
                await out.send(batch)
        except StoreFault as exc:
            journal.stop(exc)
            return
        if missing and not journal.halted:
            await out.send([UnknownRecipient(user_id) for user_id in missing])
