"""Assembles the result of one send from the deliveries of every lane."""

from __future__ import annotations

from collections.abc import Sequence

from trio import MemoryReceiveChannel

from dispatcher.messages import Delivery
from dispatcher.models import Failure, SendResult


async def collect(results: MemoryReceiveChannel[Delivery], channels: Sequence[str]) -> SendResult:
    result = SendResult()
    summary = result.summary
    # Every lane sees every selected user once, so the first lane's count is the number of users.
    counting = channels[0]
    with results:
        async for delivery in results:
            counts = getattr(summary, delivery.status)
            counts[delivery.channel] = counts.get(delivery.channel, 0) + 1
            if delivery.status == "failed":
                result.failures.append(Failure(delivery.user_id, delivery.channel, delivery.error or "failed"))
            if delivery.channel == counting and delivery.user_found:
                summary.users += 1
    return result
