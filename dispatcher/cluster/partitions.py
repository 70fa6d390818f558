"""Partitions of large sends on a Redis Stream, consumed by every process of the cluster.

A job's users are split into ranges (`Partition`: users after `after`, up to and including
`upto`) and published to the stream `{namespace}:partitions`. Every process runs a few workers in
the consumer group `workers`; each worker claims one partition at a time, hands it to the
delivery callback, counts it as finished and acknowledges it.

```python
queue = PartitionQueue.from_cluster(cluster)
await queue.expect(job_id, len(partitions))
await queue.publish(job_id, partitions)
nursery.start(partial(queue.serve, deliver, workers=2, claim_idle_seconds=30))
acked, total = await queue.progress(job_id)
```

Delivery is at least once: the callback must be idempotent (the ledger makes it so).

- A worker that dies mid-partition (SIGKILL, lost host) leaves the entry pending; once it has been
  idle `claim_idle_seconds`, another worker's periodic XAUTOCLAIM takes it over and delivers it.
- A worker whose callback runs longer than that is not robbed: while the callback runs, the
  worker touches the entry (XCLAIM to itself, JUSTID, in a script that first checks it still owns
  it), which resets its idle time. A cancelled worker (shutdown) marks its entry idle at once, so
  another process takes it over without waiting.
- A failing callback is logged and its entry left pending: it is retried (by any process) after
  the idle time, and the worker backs off before reading more.
- A partition is counted as finished once, however often it is delivered: a Redis SET per job of
  finished partition indexes (SADD), whose SCARD is the progress.
- Trimming: each entry is XDEL'ed with its XACK, so the stream holds exactly the unfinished
  partitions. No MAXLEN on XADD: an approximate MAXLEN trims by count, whether consumed or not,
  so a job larger than the bound (or consumers behind) would silently lose partitions. XDEL is
  safe because there is one consumer group.
- Redis unreachable: workers log once per outage, back off and retry; `serve` never raises for it.
  Redis restarted without persistence (the tests' and the default compose setting): the stream,
  the group and the counters are gone, so unfinished partitions published before the restart are
  lost and the jobs' progress restarts from zero; the workers recreate the group and go on with
  what is published afterwards. With AOF/RDB persistence the stream, its pending entries and the
  counters survive, and consumption resumes where it was.
"""

from __future__ import annotations

import json

import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from coredis.exceptions import StreamConsumerGroupError, StreamDuplicateConsumerGroupError

from ..errors import DispatcherError
from .redis import _FAILURES

if TYPE_CHECKING:
    import coredis

    from .redis import Cluster

log = logging.getLogger(__name__)

GROUP = "workers"
PUBLISH_BATCH = 500  # XADDs per pipelined round trip
COUNTER_TTL_SECONDS = 86_400  # a job's counters expire a day after their last update
FORGET_IDLE_CONSUMERS_SECONDS = 3_600
_BACKOFF_INITIAL = 0.05
_BACKOFF_MAX = 1.0
_HANDLER_BACKOFF_MAX = 5.0
_BLOCK_MARGIN = 0.8  # XREADGROUP blocks at most this fraction of the client's answer timeout

# Touch (idle 0: keep-alive) or release (idle = claim time: take-over at once) an entry, only
# while `consumer` still owns it. KEYS: stream. ARGV: group, consumer, entry id, idle ms.
# Returns 1 when done, 0 when the entry is no longer this consumer's (reclaimed, acked, lost).
_TOUCH_SCRIPT = """
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if type(p) ~= 'table' or p.err or #p == 0 or p[1][2] ~= ARGV[2] then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""

# Forget consumers with nothing pending, idle for more than ARGV[2] ms: every process start adds
# its own, and a dead process's would stay in the group for ever. In one script, so that no
# consumer can read an entry between the check and the deletion (DELCONSUMER drops what a
# consumer holds). KEYS: stream. ARGV: group, idle ms. Returns how many were forgotten.
_FORGET_SCRIPT = """
local forgotten = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    forgotten = forgotten + 1
  end
end
return forgotten
"""

# Count partition ARGV[1] as finished; refresh the job's counters' expiry. KEYS: finished set,
# expected total. ARGV: index, ttl s. Returns {1 if new else 0, finished count, total or -1}.
_FINISH_SCRIPT = """
local new = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local total = redis.call('GET', KEYS[2])
if total then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return {new, redis.call('SCARD', KEYS[1]), tonumber(total or -1)}
"""


class PartitionQueueUnavailable(DispatcherError):
    """Redis did not take or answer a publish/expect/progress call (nothing is retried here)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Partition:
    """Users of job `job_id` after `after` (None: from the first) up to and including `upto`;
    `index` numbers the job's partitions from 0. `users` lists the partition's user ids when the
    publisher knows them (the dispatcher does: ids of mixed types have no common order, so a
    range alone could not select them)."""

    job_id: str
    after: str | None
    upto: str
    index: int
    users: tuple[str, ...] = ()

    def to_fields(self) -> dict[str, str]:
        return {
            "job": self.job_id,
            "after": self.after or "",
            "upto": self.upto,
            "index": str(self.index),
            "users": json.dumps(self.users),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> Partition:
        """From a stream entry's field values (bytes or str). Raises KeyError/ValueError."""
        decoded = {_text(key): _text(value) for key, value in fields.items()}
        users = json.loads(decoded.get("users") or "[]")
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ValueError("users must be a list of strings")
        return cls(
            job_id=decoded["job"],
            after=decoded["after"] or None,
            upto=decoded["upto"],
            index=int(decoded["index"]),
            users=tuple(users),
        )


@dataclass(slots=True)
class QueueStats:
    handled: int = 0  # callbacks that returned
    reclaimed: int = 0  # entries taken over from another (or an earlier) consumer
    failed: int = 0  # callbacks that raised
    duplicates: int = 0  # handled partitions that were already counted as finished
    lost: int = 0  # entries taken over by someone else while their callback ran
    malformed: int = 0  # entries that are no partition (dropped)


Handler = Callable[[Partition], Awaitable[None]]
JobCompleteHandler = Callable[[str], Awaitable[None]]


class PartitionQueue:
    """The cluster's partition stream. One instance per process (share it among its workers);
    `consumer` (default: host, pid and a random suffix) names this process's consumers, one per
    worker (`{consumer}-{i}`). `timeout` bounds each Redis call (pool wait included)."""

    def __init__(
        self,
        client: coredis.Redis[Any],
        namespace: str,
        *,
        consumer: str | None = None,
        timeout: float = 0.5,
        counter_ttl_seconds: int = COUNTER_TTL_SECONDS,
    ) -> None:
        self.stream = f"{namespace}:partitions"
        self.group = GROUP
        self.namespace = namespace
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stats = QueueStats()
        self._client = client
        self._timeout = timeout
        self._ttl = counter_ttl_seconds
        self._touch = client.register_script(_TOUCH_SCRIPT)
        self._finish_script = client.register_script(_FINISH_SCRIPT)
        self._forget_script = client.register_script(_FORGET_SCRIPT)
        stream_timeout = client.connection_pool.connection_kwargs.get("stream_timeout")
        # A blocked XREADGROUP must answer before the client gives up on it.
        self._max_block_ms = int(stream_timeout * 1000 * _BLOCK_MARGIN) if stream_timeout else None
        self._group_ready = False
        self._scan_cursor = "0-0"
        self._next_scan = float("-inf")
        self._down_since: float | None = None
        self._taking = True
        # Set once every worker of `serve` has returned (after `stop_taking`).
        self.stopped = trio.Event()

    @classmethod
    def from_cluster(cls, cluster: Cluster, **kwargs: Any) -> PartitionQueue:
        """Share the cluster's client (its answer timeout caps `serve`'s `block_ms`)."""
        kwargs.setdefault("timeout", cluster._timeout)
        return cls(cluster._client, cluster.namespace, **kwargs)

    # -- keys ---------------------------------------------------------------------------------

    def finished_key(self, job_id: str) -> str:
        return f"{self.namespace}:job:{{{job_id}}}:finished"

    def expected_key(self, job_id: str) -> str:
        return f"{self.namespace}:job:{{{job_id}}}:expected"

    async def forget_idle_consumers(self, idle_seconds: float = FORGET_IDLE_CONSUMERS_SECONDS) -> int:
        """Remove the group's consumers that hold nothing and were idle that long (a live but idle
        one is simply created again by its next read)."""
        with trio.fail_after(2 * self._timeout):
            return int(await self._forget_script(keys=[self.stream], args=[self.group, int(idle_seconds * 1000)]))

    def stop_taking(self) -> None:
        """Drain: workers finish the partition they hold and take no other (within one block
        time); `stopped` is set when the last has returned. Untaken partitions stay on the stream
        for the other processes."""
        self._taking = False

    @property
    def available(self) -> bool:
        """False from a failed Redis call of a worker until the next one that succeeds."""
        return self._down_since is None

    # -- producer side ------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the stream and the group unless they exist. From id 0: partitions published
        before the group existed are consumed too."""
        try:
            with trio.fail_after(2 * self._timeout):
                await self._client.xgroup_create(self.stream, self.group, "0", mkstream=True)
        except StreamDuplicateConsumerGroupError:
            pass  # BUSYGROUP: another process made it
        self._group_ready = True

    async def publish(self, job_id: str, partitions: Sequence[Partition]) -> None:
        """Append the partitions to the stream, `PUBLISH_BATCH` per round trip. Raises
        `PartitionQueueUnavailable`; a retried publish may add duplicates, which are harmless."""
        for partition in partitions:
            if partition.job_id != job_id:
                raise ValueError(f"partition of job {partition.job_id!r} published for {job_id!r}")
        try:
            if not self._group_ready:
                await self.ensure_group()
            for start in range(0, len(partitions), PUBLISH_BATCH):
                with trio.fail_after(2 * self._timeout + 0.001 * PUBLISH_BATCH):
                    async with self._client.pipeline(transaction=False) as pipe:
                        for partition in partitions[start : start + PUBLISH_BATCH]:
                            pipe.xadd(self.stream, partition.to_fields())
        except _FAILURES as exc:
            raise PartitionQueueUnavailable(f"publishing job {job_id}'s partitions: redis {exc}") from exc

    async def expect(self, job_id: str, total: int) -> None:
        """Record how many partitions job `job_id` has (expires with the job's counters)."""
        try:
            with trio.fail_after(2 * self._timeout):
                await self._client.set(self.expected_key(job_id), str(total), ex=self._ttl)
        except _FAILURES as exc:
            raise PartitionQueueUnavailable(f"recording job {job_id}'s total: redis {exc}") from exc

    async def done(self, job_id: str) -> int:
        """How many distinct partitions of the job have been finished."""
        return (await self.progress(job_id))[0]

    async def progress(self, job_id: str) -> tuple[int, int | None]:
        """(finished partitions, expected total or None when unknown or expired)."""
        try:
            with trio.fail_after(2 * self._timeout):
                async with self._client.pipeline(transaction=False) as pipe:
                    finished = pipe.scard(self.finished_key(job_id))
                    total = pipe.get(self.expected_key(job_id))
                count, expected = await finished, await total
        except _FAILURES as exc:
            raise PartitionQueueUnavailable(f"reading job {job_id}'s progress: redis {exc}") from exc
        return count, int(expected) if expected is not None else None

    async def mark_finished(self, partition: Partition) -> tuple[bool, int, int | None]:
        """Count the partition as finished: (newly counted, finished count, total or None)."""
        with trio.fail_after(2 * self._timeout):
            reply: list[Any] = await self._finish_script(
                keys=[self.finished_key(partition.job_id), self.expected_key(partition.job_id)],
                args=[str(partition.index), self._ttl],
            )
        new, count, total = reply
        return bool(new), int(count), int(total) if int(total) >= 0 else None

    # -- consumer side ------------------------------------------------------------------------

    async def serve(
        self,
        handler: Handler,
        *,
        workers: int = 2,
        claim_idle_seconds: float = 30.0,
        block_ms: int = 1000,
        on_job_complete: JobCompleteHandler | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run `workers` consumers until cancelled or `stop_taking`. `handler(partition)` delivers one partition;
        `on_job_complete(job_id)` (optional) runs when a finished partition brings the job's
        count to its expected total: at least once per job (again if that partition is
        delivered again), before the entry is acknowledged. Started once the group has been
        created (or that failed: the workers retry)."""
        if workers < 1 or claim_idle_seconds <= 0:
            raise ValueError("workers must be >= 1 and claim_idle_seconds > 0")
        if self._max_block_ms is not None and block_ms > self._max_block_ms:
            block_ms = max(1, self._max_block_ms)
        try:
            await self.ensure_group()
        except _FAILURES as exc:
            self._redis_failed(exc)
        async with trio.open_nursery() as nursery:
            for index in range(workers):
                nursery.start_soon(
                    self._worker, f"{self.consumer}-{index}", handler, on_job_complete, claim_idle_seconds, block_ms
                )
            task_status.started()
        self.stopped.set()

    async def _worker(
        self,
        consumer: str,
        handler: Handler,
        on_job_complete: JobCompleteHandler | None,
        claim_idle: float,
        block_ms: int,
    ) -> None:
        redis_backoff = _BACKOFF_INITIAL
        handler_failures = 0
        while self._taking:
            try:
                found = await self._next_entry(consumer, claim_idle, block_ms)
            except _FAILURES as exc:
                self._redis_failed(exc)
                await trio.sleep(redis_backoff * random.uniform(0.5, 1.0))
                redis_backoff = min(_BACKOFF_MAX, 2 * redis_backoff)
                continue
            self._redis_answered()
            redis_backoff = _BACKOFF_INITIAL
            if found is None:
                continue
            entry_id, fields = found
            if not self._taking:  # read while draining: another process takes it at once
                await self._hand_over(consumer, entry_id, claim_idle)
                return
            if await self._process(consumer, entry_id, fields, handler, on_job_complete, claim_idle):
                handler_failures = 0
            else:
                handler_failures += 1  # do not spin on a failing handler
                await trio.sleep(
                    min(_HANDLER_BACKOFF_MAX, _BACKOFF_INITIAL * 2**handler_failures) * random.uniform(0.5, 1.0)
                )

    async def _next_entry(
        self, consumer: str, claim_idle: float, block_ms: int
    ) -> tuple[str, Mapping[Any, Any]] | None:
        """An entry idle for `claim_idle` (scanned every half of it), else a new one, else None."""
        try:
            if not self._group_ready:
                await self.ensure_group()
            if trio.current_time() >= self._next_scan:
                with trio.fail_after(2 * self._timeout):
                    reply = await self._client.xautoclaim(
                        self.stream, self.group, consumer, int(claim_idle * 1000), self._scan_cursor, count=1
                    )
                cursor, entries = _text(reply[0]), reply[1]
                self._scan_cursor = cursor
                if cursor == "0-0":  # a full pass over the pending entries: next one in a while
                    self._next_scan = trio.current_time() + claim_idle / 2
                    await self.forget_idle_consumers()
                if entries:
                    entry = entries[0]
                    if not isinstance(entry, (str, bytes)):
                        self.stats.reclaimed += 1
                        log.info("partition entry %s reclaimed by %s", _text(entry.identifier), consumer)
                        return _text(entry.identifier), entry.field_values
            with trio.fail_after(block_ms / 1000 + 2 * self._timeout):
                read = await self._client.xreadgroup(self.group, consumer, {self.stream: ">"}, count=1, block=block_ms)
        except StreamConsumerGroupError:  # NOGROUP: Redis lost the stream (restart, flush)
            log.warning(
                "partition stream %s has no group %s (redis lost its data?): creating it", self.stream, self.group
            )
            self._group_ready = False
            await self.ensure_group()
            return None
        if not read:
            return None
        for entries in read.values():
            for entry in entries:
                return _text(entry.identifier), entry.field_values
        return None

    async def _process(
        self,
        consumer: str,
        entry_id: str,
        fields: Mapping[Any, Any],
        handler: Handler,
        on_job_complete: JobCompleteHandler | None,
        claim_idle: float,
    ) -> bool:
        """Deliver one entry; True unless the handler raised (then it is left pending)."""
        try:
            partition = Partition.from_fields(fields)
        except (KeyError, ValueError, UnicodeDecodeError):
            log.error("partition stream entry %s is no partition (%r): dropped", entry_id, dict(fields))
            self.stats.malformed += 1
            await self._acknowledge(entry_id)
            return True
        failed = settled = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_alive, consumer, entry_id, partition, claim_idle / 3)
                try:
                    await handler(partition)
                except DispatcherError as exc:  # the store or the limiter is away: expected, no traceback
                    failed = True
                    log.warning(
                        "partition %d of job %s (entry %s) stopped: %s; left pending, retried after %gs",
                        partition.index,
                        partition.job_id,
                        entry_id,
                        exc,
                        claim_idle,
                    )
                except Exception:
                    failed = True
                    log.exception(
                        "partition %d of job %s (entry %s) failed; left pending, retried after %gs",
                        partition.index,
                        partition.job_id,
                        entry_id,
                        claim_idle,
                    )
                finally:
                    nursery.cancel_scope.cancel()
            if failed:
                self.stats.failed += 1
            else:
                self.stats.handled += 1
                await self._finish(partition, entry_id, on_job_complete)
            settled = True
        finally:
            if not settled:
                # Cancelled (shutting down) mid-partition: let another process take it over at once.
                await self._hand_over(consumer, entry_id, claim_idle)
        return not failed

    async def _hand_over(self, consumer: str, entry_id: str, claim_idle: float) -> None:
        """Make our pending entry look idle for `claim_idle`: the next XAUTOCLAIM anywhere takes it."""
        with trio.CancelScope(shield=True), trio.move_on_after(2 * self._timeout):
            try:
                await self._touch(keys=[self.stream], args=[self.group, consumer, entry_id, int(claim_idle * 1000)])
            except _FAILURES:
                pass

    async def _keep_alive(self, consumer: str, entry_id: str, partition: Partition, every: float) -> None:
        while True:
            await trio.sleep(every)
            try:
                with trio.fail_after(2 * self._timeout):
                    touched: int = await self._touch(keys=[self.stream], args=[self.group, consumer, entry_id, 0])
            except _FAILURES as exc:
                self._redis_failed(exc)
                continue
            self._redis_answered()
            if not touched:
                self.stats.lost += 1
                log.warning(
                    "partition %d of job %s (entry %s) is no longer %s's (reclaimed, or redis "
                    "lost it) while it is being delivered: a copy may be handed to another worker",
                    partition.index,
                    partition.job_id,
                    entry_id,
                    consumer,
                )
                return

    async def _finish(self, partition: Partition, entry_id: str, on_job_complete: JobCompleteHandler | None) -> None:
        """Count the partition, tell about a complete job, then XACK + XDEL; Redis failures are
        retried until it answers (a cancelled worker leaves the entry to be redelivered)."""
        backoff = _BACKOFF_INITIAL
        while True:
            try:
                new, count, total = await self.mark_finished(partition)
                break
            except _FAILURES as exc:
                self._redis_failed(exc)
                await trio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(_BACKOFF_MAX, 2 * backoff)
        self._redis_answered()
        if not new:
            self.stats.duplicates += 1
        if on_job_complete is not None and total is not None and count >= total:
            try:
                await on_job_complete(partition.job_id)
            except Exception:
                log.exception("job %s complete: the completion callback failed", partition.job_id)
        await self._acknowledge(entry_id)

    async def _acknowledge(self, entry_id: str) -> None:
        backoff = _BACKOFF_INITIAL
        while True:
            try:
                with trio.fail_after(2 * self._timeout):
                    async with self._client.pipeline(transaction=False) as pipe:
                        pipe.xack(self.stream, self.group, [entry_id])
                        pipe.xdel(self.stream, [entry_id])
            except _FAILURES as exc:
                self._redis_failed(exc)
                await trio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(_BACKOFF_MAX, 2 * backoff)
                continue
            self._redis_answered()
            return

    def _redis_failed(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = trio.current_time()
            log.warning(
                "partition queue %s: redis failed (%s: %s); workers retry", self.stream, type(exc).__name__, exc
            )

    def _redis_answered(self) -> None:
        if self._down_since is not None:
            log.warning(
                "partition queue %s: redis answers again after %.1fs",
                self.stream,
                trio.current_time() - self._down_since,
            )
            self._down_since = None
