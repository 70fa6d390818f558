"""Turns users into one channel's messages; skips, render failures and what an earlier run of the
job already settled go straight to the collector.

Rendering runs off the event loop, a chunk of users per worker-thread hop, each rendering under
`[templates].max_render_ms`. An overrun counts once a second attempt overruns too: on a busy or
oversubscribed machine a trivial rendering can be charged for a CPU hiccup, a hostile one
overruns every time. A template that overruns for a few users will for all of them: after
`POISONED_AFTER` confirmed overruns the channel's remaining users fail at once instead of each
burning the budget.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from trio import MemoryReceiveChannel, MemorySendChannel

from .journal import Unrecorded
from .messages import Delivery, Message, User
from .faults import RenderFault, RenderOverrun, StoreFault
from .ports import Lane, RenderJobs
from .resolver import UnknownRecipient

CHUNK = 32
POISONED_AFTER = 3


async def render(
    users: MemoryReceiveChannel[list[User | UnknownRecipient]],
    out: MemorySendChannel[Message],
    results: MemorySendChannel[Delivery],
    plan: Lane,
    data: dict[str, Any],
    journal: Unrecorded,
    render_jobs: RenderJobs,
) -> None:
    """`render_jobs` runs a chunk of renderings (`render_budget.render_batch` with the budget)."""
    overruns: list[str] = []
    chunk_size = 1
    with users, out, results:
        async for batch in users:
            if journal.halted:
                continue  # keep draining so the resolver is not blocked
            ids = [_id_of(user, plan) for user in batch]
            try:
                settled = await journal.settled(plan.channel, ids)
            except StoreFault as exc:
                journal.stop(exc)
                continue
            pending = [user for user, user_id in zip(batch, ids) if user_id not in settled]
            for delivery in settled.values():
                await results.send(delivery)
            while pending:
                # Chunks grow from one user: a hostile template is found out after a few renderings.
                chunk, pending = pending[:chunk_size], pending[chunk_size:]
                chunk_size = min(CHUNK, chunk_size * 2)
                if len(overruns) >= POISONED_AFTER:
                    outcomes: list[Any] = [_poisoned(user, plan, overruns[0]) for user in chunk]
                else:
                    outcomes = await render_jobs([partial(_render_one, user, plan, data) for user in chunk])
                    again = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, RenderOverrun)]
                    if again:
                        retried = await render_jobs([partial(_render_one, chunk[i], plan, data) for i in again])
                        for i, outcome in zip(again, retried):
                            outcomes[i] = outcome
                for user, outcome in zip(chunk, outcomes):
                    if isinstance(outcome, RenderOverrun):
                        overruns.append(str(outcome))
                        outcome = Delivery(plan.id_of(user), plan.channel, "failed", str(outcome), kind="render")
                    if isinstance(outcome, Message):
                        await out.send(outcome)  # blocks while the sender is behind: backpressure
                    else:
                        await results.send(outcome)


def _id_of(user: User | UnknownRecipient, plan: Lane) -> str:
    return user.user_id if isinstance(user, UnknownRecipient) else plan.id_of(user)


def _poisoned(user: User | UnknownRecipient, plan: Lane, reason: str) -> Delivery:
    if isinstance(user, UnknownRecipient):
        return _render_one(user, plan, {})  # type: ignore[return-value]
    return Delivery(
        plan.id_of(user),
        plan.channel,
        "failed",
        f"{reason} (for {POISONED_AFTER} users: not rendered for the others)",
        kind="render",
    )


def _render_one(user: User | UnknownRecipient, plan: Lane, data: dict[str, Any]) -> Message | Delivery:
    """Runs in the render thread."""
    if isinstance(user, UnknownRecipient):
        return Delivery(user.user_id, plan.channel, "failed", "user not found", user_found=False, kind="not_found")
    try:
        message = plan.message_for(user, data)
    except RenderFault as exc:
        return Delivery(plan.id_of(user), plan.channel, "failed", str(exc), kind="render")
    return message if message is not None else Delivery(plan.id_of(user), plan.channel, "skipped")
