"""Turns users into one channel's messages; skips, render failures and what an earlier run of the
job already settled go straight to the collector.

`render_users` renders a chunk of users: texts that cannot run away on the event loop, the others
in a worker process under a CPU budget per user (`[templates].max_render_ms`). An overrun counts
once a second attempt overruns too: a rendering can be charged for a CPU hiccup (a page fault storm,
a garbage collection), a hostile one overruns every time. A template that overruns for a few users
will for all of them: after `POISONED_AFTER` confirmed overruns the channel's remaining users fail
at once instead of each burning the budget (and a worker process).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trio import MemoryReceiveChannel, MemorySendChannel

from .faults import RenderOverrun, StoreFault
from .journal import Unrecorded
from .messages import Delivery, Message, User
from .ports import Lane, RenderJobs
from .resolver import UnknownRecipient, not_found

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
    """`render_jobs` renders a chunk of users (the dispatcher passes `render_pool.RenderPool.render_users`)."""
    overruns: list[str] = []
    chunk_size = 1
    with users, out, results:
        async for batch in users:
            if journal.halted:
                continue  # keep draining so the resolver is not blocked
            split = await unsettled(batch, plan, journal)
            if split is None:
                continue
            settled, pending = split
            for delivery in settled:
                await results.send(delivery)
            while pending:
                # Chunks grow from one user: a hostile template is found out after a few renderings.
                chunk, pending = pending[:chunk_size], pending[chunk_size:]
                chunk_size = min(CHUNK, chunk_size * 2)
                if len(overruns) >= POISONED_AFTER:
                    outcomes: list[Message | Delivery] = [_poisoned(user, plan, overruns[0]) for user in chunk]
                else:
                    outcomes = await render_chunk(render_jobs, chunk, plan, data, overruns)
                for outcome in outcomes:
                    if isinstance(outcome, Message):
                        await out.send(outcome)  # blocks while the sender is behind: backpressure
                    else:
                        await results.send(outcome)


async def unsettled(
    batch: Sequence[User | UnknownRecipient], plan: Lane, journal: Unrecorded
) -> tuple[list[Delivery], list[User | UnknownRecipient]] | None:
    """What an earlier run of the job settled for `batch` on this channel, and the users still to
    render; None when the store failed (the run is then stopped)."""
    ids = [_id_of(user, plan) for user in batch]
    try:
        settled = await journal.settled(plan.channel, ids)
    except StoreFault as exc:
        journal.stop(exc)
        return None
    return list(settled.values()), [user for user, user_id in zip(batch, ids) if user_id not in settled]


async def render_chunk(
    render_jobs: RenderJobs,
    chunk: Sequence[User | UnknownRecipient],
    plan: Lane,
    data: dict[str, Any],
    overruns: list[str],
) -> list[Message | Delivery]:
    """Each user's message, or the delivery that settles them (skipped, not found, failed). A
    rendering that overruns its budget is tried once more; an overrun the second time fails its
    user, and its reason joins `overruns`."""
    outcomes = await _render(render_jobs, chunk, plan, data)
    again = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, RenderOverrun)]
    if again:
        retried = await _render(render_jobs, [chunk[i] for i in again], plan, data)
        for i, outcome in zip(again, retried):
            outcomes[i] = outcome
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, RenderOverrun):
            overruns.append(str(outcome))
            outcomes[i] = Delivery(_id_of(chunk[i], plan), plan.channel, "failed", str(outcome), kind="render")
    return outcomes


def _id_of(user: User | UnknownRecipient, plan: Lane) -> str:
    return user.user_id if isinstance(user, UnknownRecipient) else plan.id_of(user)


async def _render(
    render_jobs: RenderJobs, chunk: Sequence[User | UnknownRecipient], plan: Lane, data: dict[str, Any]
) -> list[Any]:
    known = [user for user in chunk if not isinstance(user, UnknownRecipient)]
    rendered = iter(await render_jobs(plan, known, data) if known else [])
    return [_not_found(user, plan) if isinstance(user, UnknownRecipient) else next(rendered) for user in chunk]


def _not_found(user: UnknownRecipient, plan: Lane) -> Delivery:
    return not_found(user.user_id, plan.channel)


def _poisoned(user: User | UnknownRecipient, plan: Lane, reason: str) -> Delivery:
    if isinstance(user, UnknownRecipient):
        return _not_found(user, plan)
    return Delivery(
        plan.id_of(user),
        plan.channel,
        "failed",
        f"{reason} (for {POISONED_AFTER} users: not rendered for the others)",
        kind="render",
    )
