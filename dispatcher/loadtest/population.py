"""Synthetic users, derived from their index alone so that any process (the harness, a baseline
subprocess) can recompute a user's addresses without holding the population in memory.

Every user belongs to the cluster `loadtest` and to one of ten `shard-N` clusters. The mix
exercises the skip and multi-device paths: 4% have no e-mail address, 10% no phone number,
12.5% no device token, and 1 in 5 have two or three device tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pymongo import MongoClient

CLUSTER = "loadtest"
MAX_USERS = 10_000_000  # phone numbers are +1555 and seven digits


@dataclass(frozen=True, slots=True)
class Population:
    size: int

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_USERS:
            raise ValueError(f"a population holds 1 to {MAX_USERS} users")

    @staticmethod
    def user_id(index: int) -> str:
        return f"u{index:07d}"

    def index_of(self, user_id: str) -> int | None:
        if len(user_id) == 8 and user_id[0] == "u" and user_id[1:].isdigit():
            index = int(user_id[1:])
            return index if index < self.size else None
        return None

    @staticmethod
    def email(index: int) -> str | None:
        return None if index % 25 == 24 else f"user{index}@example.com"

    @staticmethod
    def phone(index: int) -> str | None:
        return None if index % 10 == 9 else f"+1555{index:07d}"

    @staticmethod
    def tokens(index: int) -> tuple[str, ...]:
        if index % 8 == 7:
            return ()
        count = 3 if index % 20 == 0 else 2 if index % 5 == 0 else 1
        # Roughly the length of a real FCM registration token.
        return tuple(
            f"{index:07d}-{k}:APA91b" + hashlib.blake2b(f"{index}/{k}".encode(), digest_size=48).hexdigest()
            for k in range(count)
        )

    def addresses(self, index: int, channel: str) -> tuple[str, ...]:
        """What the service will deliver to on `channel`: one address, every device token, or none."""
        if channel == "email":
            address = self.email(index)
        elif channel in ("sms", "voice"):
            address = self.phone(index)
        else:
            return self.tokens(index)
        return () if address is None else (address,)

    def document(self, index: int) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_id": self.user_id(index),
            "name": f"User {index}",
            "clusters": [CLUSTER, f"shard-{index % 10}"],
        }
        if (email := self.email(index)) is not None:
            doc["emailAddress"] = email
        if (phone := self.phone(index)) is not None:
            doc["phoneNumber"] = phone
        tokens = self.tokens(index)
        if len(tokens) == 1:
            doc["deviceToken"] = tokens[0]  # the single-device form real stores hold most often
        elif tokens:
            doc["deviceToken"] = list(tokens)
        return doc

    def with_address(self, channel: str) -> int:
        """How many users have an address on `channel` (the others are skipped there)."""
        return sum(1 for index in range(self.size) if self.addresses(index, channel))

    def documents(self, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        for start in range(0, self.size, batch_size):
            yield [self.document(index) for index in range(start, min(start + batch_size, self.size))]


def seed_users(url: str, database: str, collection: str, population: Population, batch_size: int = 5000) -> None:
    """Replace the collection's content with the population (blocking: run it in a thread)."""
    client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    try:
        users = client[database][collection]
        users.drop()
        for batch in population.documents(batch_size):
            users.insert_many(batch, ordered=False)
        # What an operator's store would have for cluster sends.
        users.create_index("clusters")
    finally:
        client.close()
