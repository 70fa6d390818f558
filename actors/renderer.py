"""Turns users into one channel's messages; skips and render failures go straight to the collector."""

from __future__ import annotations

from typing import Any

from trio import MemoryReceiveChannel, MemorySendChannel

from dispatcher.errors import RenderError
from dispatcher.messages import Delivery, Message, User
from dispatcher.plan import ChannelPlan

from .resolver import UnknownRecipient


async def render(users: MemoryReceiveChannel[User | UnknownRecipient], out: MemorySendChannel[Message],
                 results: MemorySendChannel[Delivery], plan: ChannelPlan, data: dict[str, Any]) -> None:
    channel = plan.channel
    with users, out, results:
        async for user in users:
            if isinstance(user, UnknownRecipient):
                await results.send(Delivery(user.user_id, channel, "failed", "user not found", user_found=False))
                continue
            try:
                message = plan.message_for(user, data)
            except RenderError as exc:
                await results.send(Delivery(plan.id_of(user), channel, "failed", str(exc)))
                continue
            if message is None:
                await results.send(Delivery(plan.id_of(user), channel, "skipped"))
            else:
                await out.send(message)  # blocks while the sender is behind: backpressure
