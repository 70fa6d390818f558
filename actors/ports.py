"""What the actors need from the rest of the service, as protocols: where users come from, what
a channel lane turns a user into, what a sender delivers through, where queue depths and outcomes
are reported. `dispatcher` implements them (the store, the plan, the
transports, the metrics) and hands them in; nothing here knows MongoDB, HTTP or a provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from .faults import RenderFault
from .journal import Unrecorded
from .messages import Delivery, Message, User


class UserSource(Protocol):
    """The selected users, in batches (`dispatcher.store.Store`)."""

    def stream_users(self, recipients: Sequence[str], clusters: Sequence[str]) -> AsyncIterator[list[User]]: ...

    def user_id(self, user: User) -> str: ...


class Lane(Protocol):
    """One channel of a send (`dispatcher.plan.ChannelPlan`)."""

    @property
    def channel(self) -> str: ...

    def id_of(self, user: User) -> str: ...

    def message_for(self, user: User, data: dict[str, Any]) -> Message | None:
        """None when the user has no address on this channel; `RenderFault` when rendering fails."""
        ...


class Request(Protocol):
    """Who a send goes to and the data its templates see (`dispatcher.models.SendRequest`)."""

    @property
    def recipients(self) -> Sequence[str]: ...

    @property
    def clusters(self) -> Sequence[str]: ...

    @property
    def data(self) -> dict[str, Any]: ...


class Plan(Protocol):
    """A validated send (`dispatcher.plan.RequestPlan`)."""

    @property
    def request(self) -> Request: ...

    @property
    def channels(self) -> Sequence[Lane]: ...


class Transport(Protocol):
    """Everything a sender actor needs to deliver on one channel (`dispatcher.delivery.Transport`)."""

    @property
    def provider_name(self) -> str: ...

    @property
    def concurrency(self) -> int: ...

    async def deliver(self, message: Message, journal: Unrecorded) -> Delivery | None:
        """Deliver under the channel's limits and retries, claiming it in `journal` first: the
        outcome, or None when it was not attempted here (another run holds it, or the store
        failed: `journal.fault`). Never raises for a failed delivery."""
        ...


class Metrics(Protocol):
    """Where the actors report (`dispatcher.metrics`, a module, fits)."""

    def track_queue(self, stage: str, channel: Any) -> None: ...

    def observe_delivery(self, channel: str, provider: str, outcome: str, kind: str | None = None) -> None: ...


class Unobserved:
    """Metrics that go nowhere (an embedding or a test that does not need them)."""

    def track_queue(self, stage: str, channel: Any) -> None:
        return None

    def observe_delivery(self, channel: str, provider: str, outcome: str, kind: str | None = None) -> None:
        return None


# Renders a chunk of (known) users of one lane: per user its Message, its skipped or failed
# Delivery, or the `RenderOverrun` it ended with (`dispatcher.render_pool.RenderPool.render_users`;
# the lane is the dispatcher's own `ChannelPlan`, hence `Any`).
RenderJobs = Callable[[Any, Sequence[User], dict[str, Any]], Awaitable[list[Any]]]


async def render_inline(lane: Lane, users: Sequence[User], data: dict[str, Any]) -> list[Any]:
    """Renders on the event loop without a budget (trusted templates: tests, benchmarks)."""
    outcomes: list[Any] = []
    for user in users:
        try:
            message = lane.message_for(user, data)
        except RenderFault as exc:
            outcomes.append(Delivery(lane.id_of(user), lane.channel, "failed", str(exc), kind="render"))
            continue
        outcomes.append(message if message is not None else Delivery(lane.id_of(user), lane.channel, "skipped"))
    return outcomes
