"""One run of one job as the actors see the ledger: what an earlier run already settled, marking
deliveries `sending` just before their provider calls, recording outcomes, and the cancel flag.

`Journal` writes to the ledger; `Unrecorded` (the actors' own, `actors.journal`) is the same
interface for `[store].ledger = false` (nothing written, nothing resumable).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from actors.journal import Unrecorded, Waiting

from .ledger import FINAL_DELIVERY_STATES, Ledger
from .messages import Delivery
from .states import ACCEPTED_STATES

__all__ = ["ABANDONED_DURING_ATTEMPT", "RETRYING", "STOPPED_DURING_ATTEMPT", "Journal", "Unrecorded", "Waiting"]

STOPPED_DURING_ATTEMPT = "outcome unknown: the service stopped during the attempt"
# A delivery claimed by another run that is no longer alive, whose process may not have stopped
# (its lease or partition was taken over): the reason must not claim a crash it did not see.
ABANDONED_DURING_ATTEMPT = (
    "outcome unknown: the run that was sending it stopped answering (crash, or lease or partition taken over)"
)
# Left by a run between a failed attempt (nothing was sent) and its next: not ambiguous.
RETRYING = "retrying"


class Journal(Unrecorded):
    def __init__(self, ledger: Ledger, job_id: str, *, resumed: bool, on_ambiguous: Mapping[str, str]) -> None:
        super().__init__()
        self.job_id = job_id
        self.run_id = uuid.uuid4().hex
        self._ledger = ledger
        self._resumed = resumed
        self._on_ambiguous = on_ambiguous
        # Deliveries an earlier run (or this one, between attempts) left `sending` or `retrying`
        # that this run may send: the claim must name that run and state.
        self._resending: dict[tuple[str, str], tuple[str, str]] = {}

    async def settled(self, channel: str, user_ids: Sequence[str]) -> dict[str, Delivery]:
        """Deliveries of these users that must not be attempted again, by user id: those an
        earlier run finished, and (unless the channel resends) those it left `sending`."""
        if not self._resumed or not user_ids:
            return {}  # a new job has no history: no round trip
        settled = {}
        for user_id, doc in (await self._ledger.prior(self.job_id, channel, user_ids)).items():
            state = doc.get("state")
            if state in FINAL_DELIVERY_STATES:
                settled[user_id] = Delivery(
                    user_id,
                    channel,
                    "sent" if state in ACCEPTED_STATES else state,
                    doc.get("error"),
                    user_found=doc.get("user_found", True),
                    attempts=doc.get("attempts", 0),
                    provider_id=doc.get("provider_id"),
                    recorded=True,
                )
            elif state == "sending" and self._on_ambiguous.get(channel, "report") == "report":
                settled[user_id] = Delivery(user_id, channel, "failed", STOPPED_DURING_ATTEMPT, kind="ambiguous")
            elif state in ("sending", RETRYING):
                self._resending[(channel, user_id)] = (doc.get("run") or "", state)
        return settled

    async def sending(self, deliveries: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        claims = [(channel, user, self._resending.pop((channel, user), None)) for channel, user in deliveries]
        return await self._ledger.claim_sending(self.job_id, self.run_id, claims)

    async def retrying(self, delivery: Delivery) -> None:
        await self._ledger.release(self.job_id, self.run_id, delivery)
        self._resending[(delivery.channel, delivery.user_id)] = (self.run_id, RETRYING)

    async def record(self, deliveries: Sequence[Delivery]) -> None:
        await self._ledger.record(self.job_id, [d for d in deliveries if not (d.recorded or d.written)])
