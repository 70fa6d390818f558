"""One run of one job as the actors see the ledger: what an earlier run already settled, marking
deliveries `sending` just before their provider calls, recording outcomes, and the cancel flag.

`Journal` writes to the ledger; `Unrecorded` (the actors' own, `actors.journal`) is the same
interface for `[store].ledger = false` (nothing written, nothing resumable).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import trio

from actors.journal import Unrecorded, Waiting

from .ledger import FINAL_DELIVERY_STATES, Ledger, now_iso
from .messages import Delivery
from .models import Summary
from .states import ACCEPTED_STATES

T = TypeVar("T")

__all__ = ["OUTCOME_NOT_WRITTEN", "RETRYING", "STOPPED_DURING_ATTEMPT", "Journal", "Unrecorded", "Waiting"]

# A delivery another run claimed and never settled, although a live run settles a claim within its
# attempt's timeout: that run's process died, or stalled past the timeout (a lease or partition
# then taken over). The reason says no more than that: no process may have stopped.
STOPPED_DURING_ATTEMPT = (
    "outcome unknown: the run sending it did not settle it (its process stopped, or stalled past the attempt's timeout)"
)
# A claim of a run known to have ended (stopped by a store outage, or by Redis unreachable for a
# delivery's whole wait): its calls in flight finished before it ended, so the attempt was made and
# only the write of its outcome failed. No process stopped.
OUTCOME_NOT_WRITTEN = (
    "outcome unknown: attempted, but its outcome could not be written (the store was unavailable; "
    "the run stopped, the service did not)"
)
# How often a run waiting for another run's claim to settle reads it again.
_SETTLE_POLL_SECONDS = 0.5
# Left by a run between a failed attempt (nothing was sent) and its next: not ambiguous.
RETRYING = "retrying"


class Journal(Unrecorded):
    job_id: str

    def __init__(
        self,
        ledger: Ledger,
        job_id: str,
        *,
        resumed: bool,
        on_ambiguous: Mapping[str, str],
        settle_within: Mapping[str, float] | None = None,
        ended_runs: Collection[str] = (),
        creating: dict[str, Any] | None = None,
        single: bool = False,
    ) -> None:
        """`settle_within`: per channel, how long after its claim a live run has settled a
        delivery (its attempt's timeout, and its backoff where ambiguous attempts are resent,
        plus a margin for the outcome's write). `ended_runs`: earlier runs known to have ended
        (a run of this process that a store outage stopped): nothing of theirs is waited for.

        `creating`: the job's document, not written yet: the run's first write carries it (its
        first claim, usually), so that a small send does not wait for its job's creation and then
        for its claim, one group commit after the other. `single`: the job has exactly one
        delivery: its outcome's write also ends the job (`finish_written`), instead of a write of
        its own after it."""
        super().__init__()
        self._creating = creating
        # Set while one write carries the creation: the others wait for it, not write it again.
        self._carrier: trio.Event | None = None
        self._single = single
        # The job's final state, when the write of its only outcome ended it.
        self.finish_written: str | None = None
        self._settle_within = settle_within or {}
        self._ended_runs = set(ended_runs)
        self.job_id = job_id
        self.run_id = uuid.uuid4().hex
        self._ledger = ledger
        self._resumed = resumed
        self._on_ambiguous = on_ambiguous
        # Deliveries an earlier run (or this one, between attempts) left `sending` or `retrying`
        # that this run may send: the claim must name that run and state.
        self._resending: dict[tuple[str, str], tuple[str, str]] = {}
        # Of those left `sending`, the ones to reconcile first, with their claim time.
        self._reconciling: dict[tuple[str, str], float] = {}
        # Why the claims left `sending` were not settled, by delivery.
        self._unsettled: dict[tuple[str, str], str] = {}

    def run_ended(self, run_id: str) -> None:
        """Run `run_id` of this job is known to have ended (a shared partition's run that
        released it): nothing of it is waited for, and what it left `sending` says so."""
        self._ended_runs.add(run_id)

    async def settled(self, channel: str, user_ids: Sequence[str]) -> dict[str, Delivery]:
        """Deliveries of these users that must not be attempted again, by user id: those an
        earlier run finished, and (unless the channel resends) those it left `sending`.

        A delivery another run claimed less than `settle_within` ago may be on the wire in a run
        that is alive (a lease taken over from a stalled process, a partition republished after
        Redis lost it, or reclaimed from a slow worker): this waits until it is settled or its
        claim is older than that, and only then treats it as abandoned. So a second run of the
        same users never reports a live run's delivery as unknown, nor resends it."""
        if not self._resumed or not user_ids:
            return {}  # a new job has no history: no round trip
        prior = await self._ledger.prior(self.job_id, channel, user_ids)
        bound = self._settle_within.get(channel, 0.0)
        while bound > 0 and not self.halted:
            now = time.time()
            fresh = [
                user
                for user, doc in prior.items()
                if doc.get("state") == "sending"
                and doc.get("run") != self.run_id
                and doc.get("run") not in self._ended_runs
                and now - (doc.get("claimed_at") or 0) < bound
            ]
            if not fresh:
                break
            with self.waiting():
                await trio.sleep(_SETTLE_POLL_SECONDS)
            prior.update(await self._ledger.prior(self.job_id, channel, fresh))
        settled = {}
        if self.halted:
            # Cancelled while another run held some: that run writes their outcome, not this one.
            for user, doc in list(prior.items()):
                if doc.get("state") == "sending" and doc.get("run") != self.run_id:
                    del prior[user]
                    settled[user] = Delivery(user, channel, "cancelled", recorded=True)
        for user_id, doc in prior.items():
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
                reason = self._why_unsettled(doc)
                settled[user_id] = Delivery(user_id, channel, "failed", reason, kind="ambiguous")
            elif state in ("sending", RETRYING):
                self._resending[(channel, user_id)] = (doc.get("run") or "", state)
                if state == "sending" and self._on_ambiguous.get(channel) == "reconcile":
                    self._reconciling[(channel, user_id)] = doc.get("claimed_at") or 0.0
                    self._unsettled[(channel, user_id)] = self._why_unsettled(doc)
        return settled

    def _why_unsettled(self, doc: Mapping[str, object]) -> str:
        return OUTCOME_NOT_WRITTEN if doc.get("run") in self._ended_runs else STOPPED_DURING_ATTEMPT

    def unsettled_reason(self, channel: str, user_id: str) -> str:
        return self._unsettled.get((channel, user_id), STOPPED_DURING_ATTEMPT)

    @property
    def created(self) -> bool:
        """Whether the job's document is written (always, unless `creating` was given)."""
        return self._creating is None

    async def carrying(self, write: Callable[[dict[str, Any] | None], Awaitable[T]]) -> T:
        """`write(doc)`, with the job's document to write in the same group when it is not
        written yet (None otherwise). One write at a time carries it; the others wait for that
        one, and carry it themselves if it failed."""
        doc = None
        while self._creating is not None:
            if self._carrier is None:
                self._carrier = trio.Event()
                doc = self._creating
                break
            await self._carrier.wait()
        landed = False
        try:
            result = await write(doc)
            landed = True
            return result
        finally:
            if doc is not None:
                if landed:
                    self._creating = None
                carrier, self._carrier = self._carrier, None
                if carrier is not None:
                    carrier.set()

    async def create(self) -> None:
        """Write the job's document now, unless a write has carried it (before its id is handed
        out while it runs, and before its lease is renewed)."""
        if self._creating is not None:
            await self.carrying(self._write_creation)

    async def _write_creation(self, doc: dict[str, Any] | None) -> None:
        if doc is not None:
            await self._ledger.insert_job(doc)

    async def sending(self, deliveries: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        claims = [(channel, user, self._resending.pop((channel, user), None)) for channel, user in deliveries]
        if self._creating is None:  # per delivery: no carrying to arrange
            return await self._ledger.claim_sending(self.job_id, self.run_id, claims)
        return await self.carrying(
            lambda doc: self._ledger.claim_sending(self.job_id, self.run_id, claims, creating=doc)
        )

    def reconcile_since(self, channel: str, user_id: str) -> float | None:
        return self._reconciling.pop((channel, user_id), None)

    async def retrying(self, delivery: Delivery) -> None:
        await self._ledger.release(self.job_id, self.run_id, delivery)
        self._resending[(delivery.channel, delivery.user_id)] = (self.run_id, RETRYING)

    async def record(self, deliveries: Sequence[Delivery]) -> None:
        todo = [d for d in deliveries if not (d.recorded or d.written)]
        if not todo:
            return
        finishing = self._finishing(todo)
        if self._creating is None and finishing is None:  # per delivery: no carrying to arrange
            await self._ledger.record(self.job_id, todo)
            return
        finished = await self.carrying(
            lambda doc: self._ledger.record(self.job_id, todo, creating=doc, finishing=finishing)
        )
        if finishing is not None and finished:
            self.finish_written = finishing["state"]

    def _finishing(self, deliveries: Sequence[Delivery]) -> dict[str, Any] | None:
        """The fields that end a job of one delivery, written with its outcome: what
        `jobs.Recorded.finished` would write next (the summary as the collector counts it)."""
        if not self._single or len(deliveries) != 1 or self.fault is not None:
            return None
        summary = Summary()
        summary.count(deliveries[0], counting_users=True)
        state = "cancelled" if self.cancelled else "done"
        return {"state": state, "finished_at": now_iso(), "summary": summary.to_json(), "lease_expires": 0}
