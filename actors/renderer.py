"""Turns users into one channel's messages; skips and render failures go straight to the collector."""

from __future__ import annotations

from typing import Any

from trio import MemoryReceiveChannel, MemorySendChannel

from dispatcher.errors import RenderError
from dispatcher.messages import Delivery, Message, User
from dispatcher.plan import ChannelPlan

from .resolver import UnknownRecipient


async def render(users: MemoryReceiveChannel[list[User | UnknownRecipient]], out: MemorySendChannel[Message],
                 results: MemorySendChannel[Delivery], plan: ChannelPlan, data: dict[str, Any]) -> None:
    with users, out, results:
        async for batch in users:
            for user in batch:
                outcome = _render_one(user, plan, data)
                if isinstance(outcome, Message):
                    await out.send(outcome)  # blocks while the sender is behind: backpressure
                else:
                    await results.send(outcome)


def _render_one(user: User | UnknownRecipient, plan: ChannelPlan, data: dict[str, Any]) -> Message | Delivery:
    if isinstance(user, UnknownRecipient):
        return Delivery(user.user_id, plan.channel, "failed", "user not found", user_found=False)
    try:
        message = plan.message_for(user, data)
    except RenderError as exc:
        return Delivery(plan.id_of(user), plan.channel, "failed", str(exc))
    return message if message is not None else Delivery(plan.id_of(user), plan.channel, "skipped")
