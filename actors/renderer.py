"""Turns users into one channel's messages; skips, render failures and what an earlier run of the
job already settled go straight to the collector."""

from __future__ import annotations

from typing import Any

from trio import MemoryReceiveChannel, MemorySendChannel

from dispatcher.errors import RenderError, StoreError
from dispatcher.journal import Unrecorded
from dispatcher.messages import Delivery, Message, User
from dispatcher.plan import ChannelPlan

from .resolver import UnknownRecipient


async def render(users: MemoryReceiveChannel[list[User | UnknownRecipient]], out: MemorySendChannel[Message],
                 results: MemorySendChannel[Delivery], plan: ChannelPlan, data: dict[str, Any],
                 journal: Unrecorded) -> None:
    with users, out, results:
        async for batch in users:
            if journal.halted:
                continue  # keep draining so the resolver is not blocked
            ids = [_id_of(user, plan) for user in batch]
            try:
                settled = await journal.settled(plan.channel, ids)
            except StoreError as exc:
                journal.stop(exc)
                continue
            outcomes = [settled.get(user_id) or _render_one(user, plan, data) for user, user_id in zip(batch, ids)]
            for outcome in outcomes:
                if isinstance(outcome, Message):
                    await out.send(outcome)  # blocks while the sender is behind: backpressure
                else:
                    await results.send(outcome)


def _id_of(user: User | UnknownRecipient, plan: ChannelPlan) -> str:
    return user.user_id if isinstance(user, UnknownRecipient) else plan.id_of(user)


def _render_one(user: User | UnknownRecipient, plan: ChannelPlan, data: dict[str, Any]) -> Message | Delivery:
    if isinstance(user, UnknownRecipient):
        return Delivery(user.user_id, plan.channel, "failed", "user not found", user_found=False)
    try:
        message = plan.message_for(user, data)
    except RenderError as exc:
        return Delivery(plan.id_of(user), plan.channel, "failed", str(exc))
    return message if message is not None else Delivery(plan.id_of(user), plan.channel, "skipped")
