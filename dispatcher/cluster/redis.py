"""The process's link to the cluster's Redis: one `coredis` client, the rate-limit script, the
availability state that `/-/ready` reports, and the round-trip counters.

Every Redis call of the rate limiter goes through `Cluster._call`, which owns retries and the
fail-closed bound: while Redis does not answer, a caller keeps retrying (capped exponential
backoff with jitter) until `unavailable_after` seconds after the first failure, then gets
`RateLimitUnavailable`; once Redis has been away longer than that, each call makes one attempt.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import coredis
import trio

from .. import metrics
from coredis.exceptions import ConnectionError as RedisConnectionError, RedisError
from coredis.retry import NoRetryPolicy

from ..errors import ConfigError
from ..settings import ClusterSettings, Settings
from .limiter import ClusterBucket, RateLimitUnavailable, Reservation

log = logging.getLogger(__name__)

# GCRA on Redis's clock, for a batch of `count` tokens at once, honouring a cluster-wide pause.
#   KEYS[1]  theoretical arrival time (TAT) of the channel's next token, integer µs of Redis time
#   KEYS[2]  end of the channel's pause, µs (expires with it)
#   ARGV     interval_us, tolerance_us (= (burst - 1) * interval), count, pause_us, guard_us
# Returns {now, paused_until, first, count}: slot i is at max(now, paused_until, first + i * interval).
# A missing TAT (first use, or Redis lost its data: restart, flush, eviction) starts `guard_us`
# ahead: tokens another process reserved before the loss may still be in use.
# Numbers are formatted with %d: Redis would otherwise store them with 14 significant digits.
RATE_LIMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local pause = tonumber(ARGV[4])
local guard = tonumber(ARGV[5])
local paused = tonumber(redis.call('GET', KEYS[2]) or 0)
if pause > 0 and now + pause > paused then
  paused = now + pause
  redis.call('SET', KEYS[2], string.format('%d', paused), 'PX', math.ceil(pause / 1000) + 1)
end
if count <= 0 then
  return {now, paused, 0, 0}
end
local start = math.max(now, paused)
local stored = redis.call('GET', KEYS[1])
local tat
if stored then
  tat = math.max(tonumber(stored), start)
else
  tat = math.max(now + guard, start)
end
local first = tat - tolerance
tat = tat + count * interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 86400000)
return {now, paused, first, count}
"""

# What a lost, refused, hung or failing Redis raises (coredis runs on anyio's streams).
_FAILURES = (
    RedisError,
    OSError,
    TimeoutError,
    trio.TooSlowError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
_BACKOFF_INITIAL = 0.05
_BACKOFF_MAX = 0.5
_PAUSE_RETRY_SECONDS = 0.1


class Cluster:
    """Use `open_cluster`. `bucket()` makes the cluster-wide token bucket of a channel; `ping()`
    and `available` are for `/-/ready`; `round_trips` counts the limiter's answered script calls
    (`failed_round_trips` the others) for the load-test harness."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        namespace: str,
        *,
        unavailable_after: float,
        timeout: float,
        batch_seconds: float,
        restart_guard: float,
    ) -> None:
        self.namespace = namespace
        self.round_trips = 0
        self.failed_round_trips = 0
        self._client = client
        self._script = client.register_script(RATE_LIMIT_SCRIPT)
        self._unavailable_after = unavailable_after
        self._timeout = timeout
        self._batch_seconds = batch_seconds
        self._guard_us = math.ceil(restart_guard * 1_000_000)
        self._down_since: float | None = None
        self._last_error = ""
        self._pending_pauses: dict[tuple[str, str], float] = {}
        self._pauses_posted = trio.Event()

    @property
    def available(self) -> bool:
        """False from a failed call to Redis until the next one that succeeds."""
        return self._down_since is None

    @property
    def last_error(self) -> str:
        return self._last_error

    def keys_for(self, channel: str) -> tuple[str, str]:
        """The channel's Redis keys (TAT, pause); the hash tag keeps both in one cluster slot."""
        prefix = f"{self.namespace}:ratelimit:{{{channel}}}"
        return f"{prefix}:tat", f"{prefix}:pause"

    def bucket(self, channel: str, rate: float, burst: int = 1) -> ClusterBucket:
        """A cluster-wide token bucket for `channel`; make one per channel and share it."""
        return ClusterBucket(self, self.keys_for(channel), rate, burst, batch_seconds=self._batch_seconds)

    async def ping(self) -> bool:
        """True when Redis answers within the timeout; updates `available`."""
        try:
            with trio.fail_after(self._timeout):
                await self._client.ping()
        except _FAILURES as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    async def _warm_up(self) -> None:
        # Connect and load the script now, so that the first reservation's round trip is a
        # typical one (its tokens' timing depends on it). A Redis that is down is no error here.
        try:
            with trio.fail_after(self._timeout):
                await self._client.script_load(RATE_LIMIT_SCRIPT)
        except _FAILURES as exc:
            self._mark_down(exc)

    async def reserve(
        self, keys: tuple[str, str], interval_us: int, tolerance_us: int, count: int, *, patient: bool = True
    ) -> Reservation:
        """Run the script for `count` tokens (see `Reserver.reserve`)."""
        guard_us = self._guard_us + interval_us + tolerance_us
        reply = await self._call(keys, [interval_us, tolerance_us, count, 0, guard_us], patient=patient)
        return Reservation(*(int(value) for value in reply))

    def publish_pause(self, keys: tuple[str, str], deadline: float) -> None:
        if deadline > self._pending_pauses.get(keys, float("-inf")):
            self._pending_pauses[keys] = deadline
            self._pauses_posted.set()

    async def _publish_pauses(self) -> None:
        """Background task: write each pause to Redis, retrying until it is written or over."""
        while True:
            await self._pauses_posted.wait()
            self._pauses_posted = trio.Event()
            while self._pending_pauses:
                keys, deadline = self._pending_pauses.popitem()
                # Measured before sending: Redis starts the pause when it runs the script, later.
                remaining_us = math.ceil((deadline - trio.current_time()) * 1_000_000)
                if remaining_us <= 0:
                    continue
                try:
                    await self._call(keys, [0, 0, 0, remaining_us, 0], patient=False)
                except RateLimitUnavailable:
                    self.publish_pause(keys, deadline)
                    await trio.sleep(_PAUSE_RETRY_SECONDS)

    async def _call(self, keys: tuple[str, str], args: list[int], *, patient: bool) -> list[Any]:
        backoff = _BACKOFF_INITIAL
        while True:
            try:
                # coredis has its own timeouts; this bounds the whole call, pool wait included.
                with trio.fail_after(2 * self._timeout):
                    reply: list[Any] = await self._script(keys=list(keys), args=args)
            except _FAILURES as exc:
                self.failed_round_trips += 1
                self._mark_down(exc)
                assert self._down_since is not None
                left = self._down_since + self._unavailable_after - trio.current_time()
                if not patient or left <= 0:
                    raise RateLimitUnavailable(self._last_error) from exc
                await trio.sleep(min(left, backoff * random.uniform(0.5, 1.0)))
                backoff = min(_BACKOFF_MAX, 2 * backoff)
                continue
            self.round_trips += 1
            metrics.REDIS_LIMIT_ROUND_TRIPS.inc()
            self._mark_up()
            return list(reply)

    def _mark_down(self, exc: BaseException) -> None:
        if isinstance(exc, (TimeoutError, trio.TooSlowError)):  # before OSError: TimeoutError is one
            self._last_error = f"did not answer within {self._timeout:g}s"
        elif isinstance(exc, (RedisConnectionError, OSError)):
            self._last_error = f"unreachable ({exc})"
        else:
            self._last_error = f"error ({type(exc).__name__}: {exc})"
        if self._down_since is None:
            self._down_since = trio.current_time()
            log.warning("cluster rate limiter: redis %s; rate-limited deliveries wait for it", self._last_error)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning("cluster rate limiter: redis answers again after %.1fs", trio.current_time() - self._down_since)
            self._down_since = None


@asynccontextmanager
async def open_cluster(
    settings: Settings | ClusterSettings,
    *,
    unavailable_after: float = 2.0,
    timeout: float = 0.5,
    batch_seconds: float = 0.05,
    restart_guard: float = 1.0,
) -> AsyncIterator[Cluster]:
    """Connect to `[cluster].redis_url`, load the script, and run the task that writes pauses
    until the block exits. A Redis that is down at start-up is no error here: `ping()` answers
    False and rate-limited `acquire`s fail closed until it answers.

    `unavailable_after`: how long `acquire` retries before raising `RateLimitUnavailable`.
    `timeout`: connect and answer timeout of one call. `batch_seconds`: the most tokens one
    reservation holds, in seconds of the channel's rate. `restart_guard`: how long a channel
    waits on first use, or after Redis lost its state, for tokens reserved before to run out.
    """
    cluster_settings = settings.cluster if isinstance(settings, Settings) else settings
    url = cluster_settings.redis_url.get_secret_value()
    if not url:
        raise ConfigError("cluster.redis_url is empty: cluster mode needs Redis (REDIS_URL)")
    # No client-side retries: `Cluster._call` owns them, so the fail-closed bound is its own.
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        url, connect_timeout=timeout, stream_timeout=timeout, retry_policy=NoRetryPolicy()
    )
    async with client, trio.open_nursery() as nursery:
        cluster = Cluster(
            client,
            cluster_settings.namespace,
            unavailable_after=unavailable_after,
            timeout=timeout,
            batch_seconds=batch_seconds,
            restart_guard=restart_guard,
        )
        nursery.start_soon(cluster._publish_pauses)
        await cluster._warm_up()
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()
