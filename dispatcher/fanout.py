"""Shared fan-outs (cluster mode): one job delivered by every process on the same Redis.

The process that runs a job (it holds the job's lease) becomes its coordinator: it streams the
selected user ids from the store, publishes them as partitions of `store_batch_size` users on
the Redis Stream, records the requested ids that matched nobody, and waits until every
partition is finished. Every process's partition workers take partitions (XREADGROUP), deliver
them through the normal actor lanes and record them in the ledger; a dead worker's partitions are
reclaimed after `[store].lease_seconds`. Each delivery is claimed in the ledger by
compare-and-set before its provider call, so a partition delivered twice (reclaimed from a
worker that was only slow) sends nothing twice. A partition's run also holds the partition in the
ledger (renewed while it runs), so a copy of it — republished after Redis lost its data, or
reclaimed from a worker that was only slow — waits for that run instead of running beside it, and
is skipped once that run has delivered it. The result is assembled from the ledger.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import trio

from actors.resolver import Unmatched, not_found

from .cluster.partitions import Partition, PartitionQueue, PartitionQueueUnavailable
from .errors import LeaseLost, RequestError, StoreError
from .journal import Journal
from .ledger import FINAL_STATES, Ledger
from .models import SendRequest, SendResult, Summary
from .cancels import CancelWatch
from .context import RunContext
from .plan import RequestPlan

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.2
# How often a copy of a partition that another run holds looks again.
_HOLD_POLL_SECONDS = 0.5
_RELEASE_SECONDS = 5.0
_PLANS_CACHED = 32


class SharedFanOut:
    def __init__(
        self,
        context: RunContext,
        prepare: Callable[[SendRequest], Awaitable[RequestPlan]],
        ledger: Ledger,
        queue: PartitionQueue,
        batch_size: int,
        cancels: CancelWatch,
        lease_seconds: float,
    ) -> None:
        """`prepare` plans a job's request again in a process that did not accept it; `batch_size`
        users make a partition; `cancels` relays a cancel of the job to the partitions delivered
        here; a partition's run holds it in the ledger for `lease_seconds`, renewed while it runs."""
        self._context = context
        self._prepare = prepare
        self._ledger = ledger
        self.queue = queue
        self._batch_size = batch_size
        self._cancels = cancels
        self._lease_seconds = lease_seconds
        # Plans by job id: a worker takes many partitions of one job; compiling once is enough.
        self._plans: OrderedDict[str, RequestPlan] = OrderedDict()

    def shares(self, request: SendRequest) -> bool:
        """Large sends are shared: a cluster selection, or more ids than one store batch."""
        return bool(request.clusters) or len(request.recipients) > self._batch_size

    async def coordinate(self, job_id: str, plan: RequestPlan, journal: Journal, result: SendResult) -> None:
        """Publish the job's partitions (unless an earlier coordinator did), wait for them, and
        fill `result` from the ledger."""
        doc = await self._ledger.job(job_id)
        total = (doc or {}).get("partitions")
        if total is None:
            total = await self._publish(job_id, plan)
        return await self._follow(job_id, plan, journal, result, total)

    async def _follow(self, job_id: str, plan: RequestPlan, journal: Journal, result: SendResult, total: int) -> None:
        channels = [lane.channel for lane in plan.channels]
        while True:
            try:
                done, expected = await self.queue.progress(job_id)
            except PartitionQueueUnavailable as exc:
                log.warning("job %s: cannot follow its partitions: %s", job_id, exc)
                await trio.sleep(1.0)
                continue
            if expected is None:
                # Redis lost the job's partitions (a restart without persistence): publish them
                # again; what was delivered is settled in the ledger and not sent twice.
                log.warning("job %s: its partitions are gone from Redis; publishing them again", job_id)
                total = await self._publish(job_id, plan)
                continue
            if done >= total or journal.cancelled:
                break
            # Redis alone while waiting: counting in the ledger on every poll would cost the store
            # more than the deliveries do. The job's lease keeper relays a cancellation.
            await trio.sleep(_POLL_SECONDS)
        result.summary = Summary.from_json(await self._ledger.summary(job_id, channels))
        result.failures.extend(await self._ledger.all_failures(job_id))

    async def _publish(self, job_id: str, plan: RequestPlan) -> int:
        """Publish every partition (again, after Redis lost them: duplicates are harmless), retrying
        while Redis is away."""
        while True:
            try:
                return await self._publish_once(job_id, plan)
            except PartitionQueueUnavailable as exc:
                log.warning("job %s: cannot publish its partitions yet: %s", job_id, exc)
                await trio.sleep(1.0)

    async def _publish_once(self, job_id: str, plan: RequestPlan) -> int:
        request, store = plan.request, self._context.store
        missing = Unmatched(request.recipients)
        index = 0
        async for batch in store.stream_users(request.recipients, request.clusters, only_ids=True):
            ids = tuple(store.user_id(user) for user in batch)
            missing.saw(ids)
            await self.queue.publish(job_id, [Partition(job_id, None, ids[-1], index, ids)])
            index += 1
        await self._ledger.record(
            job_id, [not_found(user_id, lane.channel) for user_id in missing.ids() for lane in plan.channels]
        )
        await self.queue.expect(job_id, index)
        await self._ledger.update_job(job_id, partitions=index)
        log.info("job %s: %d partitions published", job_id, index)
        return index

    async def deliver(self, partition: Partition) -> None:
        """A partition worker's handler: deliver these users of the job, recorded in the ledger."""
        doc = await self._ledger.job(partition.job_id)
        if doc is None or doc["state"] in FINAL_STATES:
            return
        plan = await self._plan(partition.job_id, doc)
        if plan is None:
            return
        journal = Journal(
            self._ledger,
            partition.job_id,
            resumed=True,
            on_ambiguous=self._context.on_ambiguous,
            settle_within=self._context.settle_within,
        )
        if doc.get("cancel_requested"):
            journal.cancel()
        request = plan.request.model_copy(update={"recipients": partition.users, "clusters": ()})
        with self._cancels.watching(partition.job_id, journal):
            if not await self._hold(partition, journal):
                return
            done = False
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_holding, partition, journal)
                    await self._context.run(RequestPlan(request, plan.channels), journal=journal)
                    nursery.cancel_scope.cancel()
                done = journal.fault is None
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(_RELEASE_SECONDS), suppress(StoreError):
                    await self._ledger.release_partition(partition.job_id, partition.index, journal.run_id, done=done)
        if journal.fault is not None:
            raise journal.fault  # left pending: the partition is taken again after the idle time

    async def _hold(self, partition: Partition, journal: Journal) -> bool:
        """Hold the partition for this run in the ledger; while another run holds it (a copy
        republished after Redis lost the stream, or reclaimed from a slow worker), wait for that
        run to end or its hold to expire. False when there is nothing left to run: another run
        finished it, or the job was cancelled meanwhile (the holder reports its deliveries)."""
        while True:
            ours, holder = await self._ledger.hold_partition(
                partition.job_id, partition.index, journal.run_id, self._lease_seconds
            )
            if ours:
                if holder.get("run") and not holder.get("until"):
                    journal.run_ended(holder["run"])  # it released the partition: it has ended
                return True
            if holder.get("done"):
                log.info("job %s: partition %d was delivered by another run", partition.job_id, partition.index)
                return False
            with journal.waiting() as wait:
                await trio.sleep(_HOLD_POLL_SECONDS)
            if wait.cancelled_caught:
                return False

    async def _keep_holding(self, partition: Partition, journal: Journal) -> None:
        """Renew the partition's hold every third of its lease; if another run took it over (this
        one stalled past the lease), stop starting deliveries: that run sends the rest."""
        while True:
            await trio.sleep(self._lease_seconds / 3)
            try:
                ours = await self._ledger.renew_partition(
                    partition.job_id, partition.index, journal.run_id, self._lease_seconds
                )
            except StoreError as exc:
                log.warning("job %s: cannot renew partition %d: %s", partition.job_id, partition.index, exc)
                continue
            if not ours:
                journal.stop(
                    LeaseLost(f"partition {partition.index} of job {partition.job_id} taken over by another run")
                )
                return

    async def _plan(self, job_id: str, doc: dict[str, Any]) -> RequestPlan | None:
        plan = self._plans.get(job_id)
        if plan is None:
            try:
                plan = await self._prepare(SendRequest.parse(doc["request"]))
            except RequestError as exc:
                log.error("job %s: partition cannot be delivered: %s", job_id, exc)
                return None
            self._plans[job_id] = plan
            if len(self._plans) > _PLANS_CACHED:
                self._plans.popitem(last=False)
        return plan
