"""Dry runs: what a send would do, without sending or recording anything.

`Dispatcher.dry_run`, behind `POST /send?dryRun=true` (or `"dryRun": true` in the body) and
`dispatcher render`, goes through the checks of a real send (`Dispatcher.prepare`: channels,
template, compilation, attachments), selects the same users (the store's stream, the same
`__STATE__` rule, requested ids that match no one), and renders the messages of the first
`[dispatcher].preview_users` users with the plan a real send uses (`ChannelPlan.message_for`,
under the same render budget). Every other user is counted, not rendered: selected when it has a
valid address for the channel, skipped when it has none, failed when the address is invalid.
Nothing reaches a provider and nothing is written to the ledger. The answer is a `DryRun`, which
the HTTP layer and the command line write as JSON (`wire.py`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from actors.ports import RenderJobs
from actors.resolver import Unmatched

from .messages import Delivery, Message, User
from .models import Failure, SendRequest
from .plan import ChannelPlan, RequestPlan, addresses_of
from .store import Store

# Skipped deliveries and failures listed in the answer (all are counted).
MAX_LISTED = 100


@dataclass(frozen=True, slots=True)
class Skipped:
    """A delivery that a send would skip, and why."""

    user_id: str
    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class DryRunCounts:
    """The users selected, and per channel the deliveries a send would attempt (`selected`),
    skip and fail."""

    users: int
    selected: dict[str, int]
    skipped: dict[str, int]
    failed: dict[str, int]


@dataclass(frozen=True, slots=True)
class DryRun:
    """What a send of the request would do: the messages of the first users as their providers
    would be handed them, the first `MAX_LISTED` skipped deliveries and failures, and the counts
    of every user."""

    previews: list[Message]
    skipped: list[Skipped]
    failures: list[Failure]
    summary: DryRunCounts


class _Tally:
    def __init__(self) -> None:
        self.users = 0
        self.selected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.skipped_list: list[Skipped] = []
        self.failures: list[Failure] = []

    def skip(self, user_id: str, channel: str) -> None:
        self.skipped[channel] += 1
        if len(self.skipped_list) < MAX_LISTED:
            self.skipped_list.append(Skipped(user_id, channel, "no address"))

    def fail(self, user_id: str, channel: str, error: str) -> None:
        self.failed[channel] += 1
        if len(self.failures) < MAX_LISTED:
            self.failures.append(Failure(user_id, channel, error))


async def dry_run(
    request: SendRequest, plan: RequestPlan, store: Store, render_jobs: RenderJobs, preview_users: int
) -> DryRun:
    """What a send of `request`, planned as `plan`, would do (see the module's docstring):
    `Dispatcher.dry_run` is the way in."""
    tally = _Tally()
    previews: list[Message] = []
    missing = Unmatched(request.recipients)
    async for batch in store.stream_users(request.recipients, request.clusters):
        missing.saw(store.user_id(user) for user in batch)
        shown_now = batch[: max(0, preview_users - tally.users)]
        tally.users += len(batch)
        for lane in plan.channels:
            outcomes = await render_jobs(lane, shown_now, request.data) if shown_now else []
            for user, outcome in zip(shown_now, outcomes):
                if isinstance(outcome, Message):
                    tally.selected[lane.channel] += 1
                    previews.append(outcome)
                elif isinstance(outcome, Delivery) and outcome.status == "skipped":
                    tally.skip(lane.id_of(user), lane.channel)
                elif isinstance(outcome, Delivery):
                    tally.fail(lane.id_of(user), lane.channel, outcome.error or "failed")
                else:  # RenderBudgetExceeded: the delivery would fail
                    tally.fail(lane.id_of(user), lane.channel, str(outcome))
            for user in batch[len(shown_now) :]:
                _count(lane, user, tally)
    for user_id in missing.ids():
        for lane in plan.channels:
            tally.fail(user_id, lane.channel, "user not found")
    counts = DryRunCounts(tally.users, dict(tally.selected), dict(tally.skipped), dict(tally.failed))
    return DryRun(previews, tally.skipped_list, tally.failures, counts)


def _count(lane: ChannelPlan, user: User, tally: _Tally) -> None:
    """A user beyond the previews: its address decides, as it would before rendering."""
    addresses = addresses_of(user.get(lane.address_field))
    user_id = lane.id_of(user)
    if not addresses:
        tally.skip(user_id, lane.channel)
    elif not all(lane.valid_address(a) for a in addresses):
        tally.fail(user_id, lane.channel, f"invalid address: not a valid {lane.channel} address")
    else:
        tally.selected[lane.channel] += 1


__all__ = ["MAX_LISTED", "DryRun", "DryRunCounts", "Skipped", "dry_run"]
