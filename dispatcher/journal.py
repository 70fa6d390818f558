"""One run of one job as the actors see the ledger: what an earlier run already settled, marking
deliveries `sending` just before their provider calls, recording outcomes, and the cancel flag.

`Journal` writes to the ledger; `Unrecorded` is the same interface for `[store].ledger = false`
(nothing written, nothing resumable).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from .errors import StoreError
from .ledger import FINAL_DELIVERY_STATES, Ledger
from .messages import Delivery
from .states import ACCEPTED_STATES

STOPPED_DURING_ATTEMPT = "outcome unknown: the service stopped during the attempt"


class Unrecorded:
    """Also the state every actor of one run shares: cancelled by the client, or stopped by a
    store failure (the actors stop starting deliveries; those in flight finish)."""

    job_id: str | None = None

    def __init__(self) -> None:
        self.cancelled = False
        self.fault: StoreError | None = None

    @property
    def halted(self) -> bool:
        return self.cancelled or self.fault is not None

    def cancel(self) -> None:
        self.cancelled = True

    def stop(self, fault: StoreError) -> None:
        if self.fault is None:
            self.fault = fault

    async def settled(self, channel: str, user_ids: Sequence[str]) -> dict[str, Delivery]:
        return {}

    async def sending(self, deliveries: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Record that these (channel, user id) deliveries are about to be attempted; return
        those another run has claimed (not to be attempted here)."""
        return set()

    async def record(self, deliveries: Sequence[Delivery]) -> None:
        return None

    def reconcile_since(self, channel: str, user_id: str) -> float | None:
        """When an earlier run claimed this delivery before stopping during its attempt (epoch
        seconds), if the provider is to be asked about it before sending; else None."""
        return None


class Journal(Unrecorded):
    def __init__(self, ledger: Ledger, job_id: str, *, resumed: bool, on_ambiguous: Mapping[str, str]) -> None:
        super().__init__()
        self.job_id = job_id
        self.run_id = uuid.uuid4().hex
        self._ledger = ledger
        self._resumed = resumed
        self._on_ambiguous = on_ambiguous
        # Deliveries an earlier run left `sending` that this run may send again ("resend"): the
        # claim must name that run.
        self._resending: dict[tuple[str, str], str] = {}
        # Of those, the ones to reconcile first, with their claim time.
        self._reconciling: dict[tuple[str, str], float] = {}

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
            elif state == "sending":
                self._resending[(channel, user_id)] = doc.get("run") or ""
                if self._on_ambiguous.get(channel) == "reconcile":
                    self._reconciling[(channel, user_id)] = doc.get("claimed_at") or 0.0
        return settled

    async def sending(self, deliveries: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        claims = [(channel, user, self._resending.pop((channel, user), None)) for channel, user in deliveries]
        return await self._ledger.claim_sending(self.job_id, self.run_id, claims)

    def reconcile_since(self, channel: str, user_id: str) -> float | None:
        return self._reconciling.pop((channel, user_id), None)

    async def record(self, deliveries: Sequence[Delivery]) -> None:
        await self._ledger.record(self.job_id, [d for d in deliveries if not d.recorded])
