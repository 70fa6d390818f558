"""What the actors need of the ledger during one run, and the state they share.

`Unrecorded` is both: the journal of a run that is not recorded (`[store].ledger = false`:
nothing written, nothing resumable) and the base of `dispatcher.journal.Journal`, which writes
to the ledger through the same four calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from .messages import Delivery
from .ports import StoreFault


class Unrecorded:
    """Also the state every actor of one run shares: cancelled by the client, or stopped by a
    store failure (the actors stop starting deliveries; those in flight finish)."""

    job_id: str | None = None

    def __init__(self) -> None:
        self.cancelled = False
        self.fault: StoreFault | None = None

    @property
    def halted(self) -> bool:
        return self.cancelled or self.fault is not None

    def cancel(self) -> None:
        self.cancelled = True

    def stop(self, fault: StoreFault) -> None:
        if self.fault is None:
            self.fault = fault

    async def settled(self, channel: str, user_ids: Sequence[str]) -> dict[str, Delivery]:
        """Deliveries of these users that an earlier run settled (not to be attempted again)."""
        return {}

    async def sending(self, deliveries: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Record that these (channel, user id) deliveries are about to be attempted; return
        those another run has claimed (not to be attempted here)."""
        return set()

    async def record(self, deliveries: Sequence[Delivery]) -> None:
        """Record these outcomes."""
        return None
