"""What `actors.run_pipeline` itself costs for a send to one user on one channel: a user source
and a transport that answer at once, so only the pipeline's own work uses the CPU.

    python benchmarks/one_user_pipeline.py [SENDS] [ROUNDS]     # defaults 3000 3

Run it with `PYTHONPATH` at two checkouts to compare them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from actors import run_pipeline
from actors.journal import Unrecorded
from actors.messages import Delivery, Message, User


class Source:
    async def stream_users(self, recipients: Sequence[str], clusters: Sequence[str]) -> AsyncIterator[list[User]]:
        yield [{"_id": r, "email": f"{r}@example.com"} for r in recipients]

    def user_id(self, user: User) -> str:
        return str(user["_id"])


class Lane:
    channel = "email"

    def id_of(self, user: User) -> str:
        return str(user["_id"])

    def message_for(self, user: User, data: dict[str, Any]) -> Message:
        return Message("email", str(user["_id"]), (str(user["email"]),), "hi")


@dataclass
class Request:
    recipients: list[str]
    clusters: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    request: Request
    channels: list[Lane]


class InstantTransport:
    provider_name = "null"
    concurrency = 16

    async def deliver(self, message: Message, journal: Unrecorded) -> Delivery:
        await trio.lowlevel.checkpoint()
        return Delivery(message.user_id, message.channel, "sent", attempts=1)


async def main(sends: int, rounds: int) -> None:
    source, transports = Source(), {"email": InstantTransport()}
    for _ in range(rounds):
        cpu = time.process_time()
        for i in range(sends):
            await run_pipeline(Plan(Request([f"u{i}"]), [Lane()]), source, transports, 64)
        print(f"run_pipeline, one user on one channel: {(time.process_time() - cpu) / sends * 1e6:.0f} µs a send")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 3000, int(sys.argv[2]) if len(sys.argv) > 2 else 3)
