"""Shared fan-outs (cluster mode): one job delivered by every process on the same Redis.

The process that runs a job (it holds the job's lease) becomes its coordinator: it streams the
selected user ids from the store, publishes them as partitions of `store_batch_size` users on
the Redis Stream, records the requested ids that matched nobody, and waits until every
partition is finished. Every process's partition workers take partitions (XREADGROUP), deliver
them through the normal actor lanes and record them in the ledger; a dead worker's partitions are
reclaimed after `[store].lease_seconds`. Each delivery is claimed in the ledger by
compare-and-set before its provider call, so a partition delivered twice (reclaimed from a
worker that was only slow) sends nothing twice. The result is assembled from the ledger.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from actors.resolver import Unmatched, not_found

from .cluster.partitions import Partition, PartitionQueue, PartitionQueueUnavailable
from .errors import RequestError
from .journal import Journal
from .ledger import FINAL_STATES, Ledger
from .models import SendRequest, SendResult, Summary
from .cancels import CancelWatch
from .context import RunContext
from .plan import RequestPlan

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.2
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
    ) -> None:
        """`prepare` plans a job's request again in a process that did not accept it; `batch_size`
        users make a partition; `cancels` relays a cancel of the job to the partitions delivered here."""
        self._context = context
        self._prepare = prepare
        self._ledger = ledger
        self.queue = queue
        self._batch_size = batch_size
        self._cancels = cancels
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
            await self._context.run(RequestPlan(request, plan.channels), journal=journal)
        if journal.fault is not None:
            raise journal.fault  # left pending: the partition is taken again after the idle time

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
