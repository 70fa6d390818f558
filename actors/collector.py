"""Assembles the result of one send from the deliveries of every lane, and records them in the
ledger in batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio
from trio import MemoryReceiveChannel

from .journal import Unrecorded
from .messages import Delivery, Failure, SendResult
from .faults import StoreFault
from .ports import Metrics

log = logging.getLogger(__name__)

# Outcomes are written when this many are pending, or when the oldest has waited this long: the
# bound on what a crash can leave `sending` although its outcome was known.
FLUSH_SIZE = 500
FLUSH_SECONDS = 0.2


async def collect(
    results: MemoryReceiveChannel[Delivery],
    result: SendResult,
    providers: Mapping[str, str],
    journal: Unrecorded,
    metrics: Metrics,
) -> None:
    """Fill `result` (owned by the caller, so that it holds what was attempted even if the send
    stops early). `providers`: the provider name of each requested channel, in request order."""
    counting = next(iter(providers))
    pending: list[Delivery] = []
    deadline = trio.current_time() + FLUSH_SECONDS

    async def flush() -> None:
        nonlocal pending
        batch, pending = pending, []
        await record(batch, journal)

    with results:
        async for delivery in results:
            count(delivery, result, providers, metrics, counting)
            pending.append(delivery)
            if len(pending) >= FLUSH_SIZE or trio.current_time() >= deadline:
                await flush()
                deadline = trio.current_time() + FLUSH_SECONDS
        await flush()


def count(
    delivery: Delivery, result: SendResult, providers: Mapping[str, str], metrics: Metrics, counting: str
) -> None:
    """Count one delivery into `result`. `providers`: the provider name of each requested
    channel; users are counted on `counting`, the first of them."""
    result.summary.count(delivery, counting_users=delivery.channel == counting)
    if delivery.status == "failed":
        result.failures.append(Failure(delivery.user_id, delivery.channel, delivery.error or "failed"))
    if not delivery.recorded:
        metrics.observe_delivery(delivery.channel, providers[delivery.channel], delivery.status, delivery.kind)


async def record(batch: list[Delivery], journal: Unrecorded) -> None:
    """Write the outcomes not written yet; a store failure stops the run (every outcome is then
    settled by whoever resumes it)."""
    if batch and journal.fault is None:
        try:
            await journal.record(batch)
        except StoreFault as exc:
            log.error("cannot record %d outcomes of job %s: %s", len(batch), journal.job_id, exc)
            journal.stop(exc)
