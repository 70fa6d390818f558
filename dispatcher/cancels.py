"""Cancels relayed to the runs of this process, whichever process took the `DELETE`.

A cancel is a flag on the job's document (`cancel_requested`) and a small document of its own
with its time (`Ledger.cancels_since`). The process that takes the request cancels its own runs
of the job at once; every process that runs jobs (whole, or partitions of shared ones) also asks,
every `POLL_SECONDS`, which cancels were requested since it last looked: one indexed query,
usually empty, whatever the number of jobs it runs. So a run ends every delivery waiting for a
slot, a token, a pause or a backoff within `POLL_SECONDS` of the cancel, plus one store round
trip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from .errors import StoreError
from .journal import Unrecorded
from .ledger import Ledger

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# Clocks of the processes (and the store's hosts) may differ a little: look back this far.
_SKEW_SECONDS = 5.0


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
        since = time.time() - _SKEW_SECONDS
        while True:
            await trio.sleep(POLL_SECONDS)
            if not self._journals:
                continue
            try:
                cancels = await self._ledger.cancels_since(since)
            except StoreError as exc:
                log.debug("cannot look for cancels: %s", exc)
                continue
            for job_id, _ in cancels:
                self.cancel(job_id)  # again for a cancel seen before: a run may have started since
            since = max(since, time.time() - _SKEW_SECONDS)


__all__ = ["POLL_SECONDS", "CancelWatch"]
