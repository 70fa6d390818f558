"""Cancels relayed to the runs of this process, whichever process took the `DELETE`.

A cancel is a flag on the job's document (`cancel_requested`). The process that takes the
request cancels its own runs of the job at once; every process also looks, every
`POLL_SECONDS`, whether any job it runs (a whole job, or partitions of a shared one) was
cancelled elsewhere: one query for all of them, not one per job. So a run ends every delivery
waiting for a slot, a token, a pause or a backoff within `POLL_SECONDS` of the cancel, plus one
store round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from .errors import StoreError
from .journal import Unrecorded
from .ledger import Ledger

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class CancelWatch:
    def __init__(self, ledger: Ledger | None) -> None:
        self._ledger = ledger
        self._journals: dict[str, set[Unrecorded]] = {}

    @contextmanager
    def watching(self, job_id: str | None, journal: Unrecorded) -> Iterator[None]:
        """While the block runs, a cancel of `job_id` cancels `journal`."""
        if job_id is None:
            yield
            return
        self._journals.setdefault(job_id, set()).add(journal)
        try:
            yield
        finally:
            journals = self._journals.get(job_id)
            if journals is not None:
                journals.discard(journal)
                if not journals:
                    del self._journals[job_id]

    def cancel(self, job_id: str) -> None:
        for journal in list(self._journals.get(job_id, ())):
            journal.cancel()

    async def run(self) -> None:
        """Poll the ledger for cancels of the jobs this process runs (forever)."""
        assert self._ledger is not None
        while True:
            await trio.sleep(POLL_SECONDS)
            ids = [job_id for job_id, journals in self._journals.items() if not all(j.cancelled for j in journals)]
            if not ids:
                continue
            try:
                cancelled = await self._ledger.cancel_requested(ids)
            except StoreError as exc:
                log.debug("cannot look for cancels: %s", exc)
                continue
            for job_id in cancelled:
                self.cancel(job_id)


__all__ = ["POLL_SECONDS", "CancelWatch"]
