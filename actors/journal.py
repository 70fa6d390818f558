"""What the actors need of the ledger during one run, and the state they share.

`Unrecorded` is both: the journal of a run that is not recorded (`[store].ledger = false`:
nothing written, nothing resumable) and the base of `dispatcher.journal.Journal`, which writes
to the ledger through the same calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

import trio

from .messages import Delivery, Message
from .faults import RunFault


class Waiting:
    """A wait before a provider call (a slot, a token, a pause, a backoff), cut short when the run
    is cancelled or stopped: `with journal.waiting() as wait: ...; wait.cancelled_caught`.
    A class, not a generator context manager: this is entered once per delivery."""

    __slots__ = ("_journal", "_scope")

    def __init__(self, journal: Unrecorded) -> None:
        self._journal = journal
        self._scope = trio.CancelScope()

    @property
    def cancelled_caught(self) -> bool:
        return self._scope.cancelled_caught

    def __enter__(self) -> Waiting:
        self._scope.__enter__()
        if self._journal.halted:
            self._scope.cancel()
        self._journal._waits.add(self._scope)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._journal._waits.discard(self._scope)
        return self._scope.__exit__(kind, exc, tb)


class Unrecorded:
    """Also the state every actor of one run shares: cancelled by the client, or stopped by a
    fault (the store, or a channel's limiter, gone: the actors stop starting deliveries; those in
    flight finish)."""

    job_id: str | None = None

    def __init__(self) -> None:
        self.cancelled = False
        self.fault: RunFault | None = None
        self._waits: set[trio.CancelScope] = set()

    @property
    def halted(self) -> bool:
        return self.cancelled or self.fault is not None

    def cancel(self) -> None:
        """Stop every delivery of the run that has not reached its provider call, at once: those
        waiting for a slot, a token, a pause or a backoff end `cancelled` (calls in flight finish)."""
        self.cancelled = True
        self._end_waits()

    def stop(self, fault: RunFault) -> None:
        if self.fault is None:
            self.fault = fault
        self._end_waits()

    def _end_waits(self) -> None:
        for scope in self._waits:
            scope.cancel()

    def waiting(self) -> Waiting:
        return Waiting(self)

    def unattempted(self, message: Message) -> Delivery | None:
        """What becomes of a message this halted run did not attempt: `cancelled` after a cancel;
        nothing after a store fault (the resumed run sends it)."""
        return Delivery(message.user_id, message.channel, "cancelled") if self.cancelled else None

    async def take(self, take_nowait: Callable[[], object], take: Callable[[], Awaitable[object]]) -> bool:
        """Take a slot or a permit: at once when one is free (no cancel scope: this runs once or
        twice per delivery), else by waiting in `waiting()`. False when a cancel or a fault of
        the run ended the wait (nothing was taken)."""
        try:
            take_nowait()
            return True
        except trio.WouldBlock:
            with self.waiting() as wait:
                await take()
            return not wait.cancelled_caught

    async def settled(self, channel: str, user_ids: Sequence[str]) -> dict[str, Delivery]:
        """Deliveries of these users that an earlier run settled (not to be attempted again)."""
        return {}

    async def sending(self, deliveries: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Record that these (channel, user id) deliveries are about to be attempted; return
        those another run has claimed (not to be attempted here)."""
        return set()

    async def retrying(self, delivery: Delivery) -> None:
        """Record that this claimed delivery's last attempt failed without reaching anyone (a
        429, a 5xx, a refused connection) and that it waits for its next: a crash meanwhile leaves
        it resendable, not ambiguous. Its next attempt claims it again (`sending`)."""
        return None

    async def record(self, deliveries: Sequence[Delivery]) -> None:
        """Record these outcomes."""
        return None

    def unsettled_reason(self, channel: str, user_id: str) -> str:
        """What is known of an earlier run's claim of this delivery that was never settled (the
        reason reported if its outcome stays unknown)."""
        return "outcome unknown: an earlier run did not settle it"

    def reconcile_since(self, channel: str, user_id: str) -> float | None:
        """When an earlier run claimed this delivery before stopping during its attempt (epoch
        seconds), if the provider is to be asked about it before sending; else None."""
        return None
