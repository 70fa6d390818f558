"""Streams the selected users from the store, each once, then the requested ids that matched none."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trio import MemorySendChannel

from dispatcher.messages import User
from dispatcher.store import Store


@dataclass(frozen=True, slots=True)
class UnknownRecipient:
    user_id: str


async def resolve(out: MemorySendChannel[User | UnknownRecipient], store: Store,
                  recipients: Sequence[str], clusters: Sequence[str]) -> None:
    with out:
        missing = dict.fromkeys(recipients)
        async for batch in store.stream_users(recipients, clusters):
            for user in batch:
                if missing:
                    missing.pop(store.user_id(user), None)
                await out.send(user)
        for user_id in missing:
            await out.send(UnknownRecipient(user_id))
