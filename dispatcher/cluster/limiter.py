"""Cluster-wide token bucket: `dispatcher.ratelimit.TokenBucket`'s interface, with the bucket's
state kept by Redis so that every process of the cluster shares one `rate_per_second` and `burst`.

Redis runs GCRA on its own clock (`dispatcher.cluster.redis`). Each token it grants owns one
`[x, x + interval)` of the channel's theoretical-arrival-time line, those of different tokens
never overlap, and GCRA lets a token be used from `x - tolerance` on
(`tolerance = (burst - 1) * interval`). A process reserves a small batch of such tokens per round trip
(a few tens of milliseconds' worth, sized by its own demand) and hands them out locally.

Why no one-second window ever holds more than `rate + burst` tokens, cluster-wide: the interval
is `(1 + headroom) / rate` (the rate is 0.5 % below the configured one), and each token is handed
out no earlier than `x - tolerance` and no later than `x + allowance`. The tokens used in a closed
window `[a, a + 1]` then have their `x` in `[a - allowance, a + 1 + tolerance]`, where disjoint
intervals can start at most `floor((1 + allowance + tolerance) / interval) + 1` times: no more than
`floor(rate + burst)` for `allowance < (floor(rate) + 1) * interval - 1`. The headroom is
what makes that allowance generous (6 ms at 1,000/s, 15 ms at 100/s, instead of under one
interval): timers, stalls and the clock mapping all fit in it. A token that found no taker in
time (no demand, a stalled event loop) is dropped, never made up for. (Should the clock mapping
alone eat the allowance, Redis being far away for the rate, each token costs several intervals:
a lower rate, never a window over the limit.)

Redis's clock is mapped to `trio.current_time()` from the round trips themselves: Redis read its
clock between our sending and our receiving, so each round trip bounds the offset between the
two clocks; the tightest bounds of the last few round trips (widened by a clock-rate allowance)
give a mapping that is never early, and whose uncertainty is taken out of `allowance`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import LimiterUnavailable

# Clock rates: how fast the offset between this host's monotonic clock and Redis's wall clock may
# change (NTP-disciplined clocks stay well within it), and how long a round trip's bounds are kept.
_DRIFT = 100e-6
_SAMPLE_HORIZON = 0.5
# The rate actually scheduled is this much below the configured one: timing slack (see above).
_RATE_HEADROOM = 0.005
# Drift over a batch's life, float rounding, the microseconds between deciding and returning.
_MARGIN_S = 50e-6
_MARGIN_FRACTION = 0.01
# Less room than this to hand a token out (Redis too far, for the rate): tokens cost more.
_MIN_ROOM_FRACTION = 0.25
# An unlimited channel has no tokens to reserve, but still learns about cluster-wide pauses.
PAUSE_POLL_SECONDS = 0.1
_UNLIMITED_RETRY_SECONDS = 1.0


class RateLimitUnavailable(LimiterUnavailable):
    """The cluster's rate limiter (Redis) cannot be reached: nothing was sent, and nothing will
    be until it answers again. Transient, so the delivery is retried later."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"rate limiter unavailable: redis {detail}")


@dataclass(frozen=True, slots=True)
class Reservation:
    """The Lua script's answer, in integer microseconds of the Redis clock.

    Token `i` of the batch (`0 <= i < count`) owns the interval starting at
    `first + tolerance + i * interval` and may be used from `max(now_us, paused_us, first + i * interval)`.
    """

    now_us: int
    paused_us: int  # end of the cluster-wide pause; at or before `now_us` when there is none
    first_us: int
    count: int


class Reserver(Protocol):
    """What a `ClusterBucket` needs from the cluster (`dispatcher.cluster.redis.Cluster`)."""

    async def reserve(
        self, keys: tuple[str, str], interval_us: int, tolerance_us: int, count: int, *, patient: bool = True
    ) -> Reservation:
        """Reserve `count` tokens (0: only read the pause). Raises `RateLimitUnavailable`; with
        `patient`, only after retrying for the cluster's bound."""
        ...

    def publish_pause(self, keys: tuple[str, str], deadline: float) -> None:
        """Tell the cluster, in the background, that the channel is paused until `deadline`
        (`trio.current_time()` units)."""
        ...


@dataclass(slots=True)
class BucketStats:
    tokens: int = 0  # handed out
    round_trips: int = 0  # reservations answered
    lost: int = 0  # reserved tokens never handed out (no demand in time, a late loop, a pause)


class RedisClock:
    """Maps Redis time (µs) to `trio.current_time()`, never early, from recent round trips."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=16)  # sent, received, redis s

    @property
    def known(self) -> bool:
        return bool(self._samples)

    def observe(self, sent: float, received: float, redis_us: int) -> None:
        self._samples.append((sent, received, redis_us / 1e6))

    def offset(self) -> tuple[float, float]:
        """`(offset, uncertainty)`: local time `redis + offset` is never before the instant Redis
        meant, and at most `uncertainty` after it."""
        now = trio.current_time()
        while len(self._samples) > 1 and now - self._samples[0][1] > _SAMPLE_HORIZON:
            self._samples.popleft()
        high = min(received - redis + _DRIFT * (now - received) for _, received, redis in self._samples)
        low = max(sent - redis - _DRIFT * (now - sent) for sent, _, redis in self._samples)
        if low > high:  # a clock was stepped: only the latest round trip holds
            sent, received, redis = self._samples[-1]
            self._samples.clear()
            self._samples.append((sent, received, redis))
            high, low = received - redis, sent - redis
        return high, high - low


class ClusterBucket:
    """Token bucket of `rate` tokens per second holding at most `burst`, shared by every process
    of the cluster that uses the same Redis, namespace and channel. `rate == 0` is unlimited.

    Same contract as `TokenBucket`: waiters are served one at a time in arrival order; `acquire`
    raises `RateLimitUnavailable` when Redis has not answered for the cluster's bound (the limit
    fails closed). Tokens already reserved are still handed out while Redis is away.

    `pause_until` takes effect at once in this process, and in the others at their next
    reservation (within one batch: `batch_seconds` of sending at most).
    """

    def __init__(
        self, reserver: Reserver, keys: tuple[str, str], rate: float, burst: int = 1, *, batch_seconds: float = 0.05
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.stats = BucketStats()
        self._reserver = reserver
        self._keys = keys
        # Integer microseconds on both sides; rounding the interval up keeps the rate at or below.
        self._interval_us = math.ceil(1_000_000 * (1 + _RATE_HEADROOM) / rate) if rate > 0 else 0
        self._interval = self._interval_us / 1e6
        self._tolerance_us = (self.burst - 1) * self._interval_us
        self._tolerance = self._tolerance_us / 1e6
        self._allowance = (
            (math.floor(rate) + 1) * self._interval - 1.0 - (_MARGIN_S + _MARGIN_FRACTION * self._interval)
        )
        self._max_batch = max(1, int(rate * batch_seconds))
        self._clock = RedisClock()
        self._tokens: deque[tuple[float, float]] = deque()  # (ripe, expiry) in trio time, in order
        self._paused_until = float("-inf")
        self._turn = trio.Lock()
        self._waiting = 0
        self._size = 1  # the next batch, before demand (grows while batches are used up)
        self._batch_len = self._batch_used = self._batch_lost = 0
        self._pause_checked = float("-inf")

    def pause_until(self, deadline: float) -> None:
        """Hand out nothing before `deadline` (a `trio.current_time()` value: a provider asked us
        to back off), here at once and cluster-wide as soon as Redis has been told."""
        if deadline > self._paused_until:
            self._paused_until = deadline
            self._reserver.publish_pause(self._keys, deadline)

    def acquire_nowait(self) -> bool:
        """Never here: the cluster's tokens come through `acquire` (its Redis round trips, its
        pause polls and its order of waiters)."""
        return False

    async def acquire(self) -> None:
        """Wait for a token. Raises `RateLimitUnavailable` (a `TransientDeliveryError`) when the
        cluster's limiter cannot be reached; a cancelled waiter loses at most what it reserved."""
        if self._interval_us == 0:
            await self._acquire_unlimited()
            return
        self._waiting += 1
        try:
            async with self._turn:
                while True:
                    now = trio.current_time()
                    if self._paused_until > now:
                        await trio.sleep_until(self._paused_until)
                        continue
                    while self._tokens and self._tokens[0][1] <= now:
                        self._tokens.popleft()
                        self._batch_lost += 1
                        self.stats.lost += 1
                    if not self._tokens:
                        await self._refill()
                        continue
                    ripe = self._tokens[0][0]
                    if ripe <= now:
                        self._tokens.popleft()
                        self._batch_used += 1
                        self.stats.tokens += 1
                        return
                    await trio.sleep_until(ripe)  # then look again: a pause may have come meanwhile
        finally:
            self._waiting -= 1

    async def _acquire_unlimited(self) -> None:
        now = trio.current_time()
        if now >= self._pause_checked + PAUSE_POLL_SECONDS:
            self._pause_checked = now  # one poll at a time: the others go on with what we know
            try:
                reply = await self._reserver.reserve(self._keys, 0, 0, 0, patient=False)
            except RateLimitUnavailable:
                # Nothing limits this channel: it does not wait for Redis, and asks again later.
                self._pause_checked = trio.current_time() + _UNLIMITED_RETRY_SECONDS
            else:
                self._learn_pause(reply, trio.current_time())
        while self._paused_until > trio.current_time():
            await trio.sleep_until(self._paused_until)

    async def _refill(self) -> None:
        if self._batch_len:
            # The last batch is spent: double while every token found a taker, else size to what was used.
            if self._batch_lost == 0:
                self._size = min(self._max_batch, 2 * self._size)
            else:
                self._size = max(1, self._batch_used)
            self._batch_len = 0
        count = min(self._max_batch, max(self._size, self._waiting))
        cost = self._cost()
        sent = trio.current_time()
        reply = await self._reserver.reserve(self._keys, cost * self._interval_us, self._tolerance_us, count)
        received = trio.current_time()
        self.stats.round_trips += 1
        self._clock.observe(sent, received, reply.now_us)
        self._learn_pause(reply, received)
        self._load(reply, cost)

    def _room(self, cost: int, uncertainty: float) -> float:
        """How long after `x - tolerance` a token of `cost` intervals may still be handed out."""
        return self._tolerance + (cost - 1) * self._interval + self._allowance - uncertainty

    def _cost(self) -> int:
        """Intervals per token: 1, unless the clock mapping leaves too little room."""
        if not self._clock.known:
            return 1
        floor = _MIN_ROOM_FRACTION * self._interval
        room = self._room(1, self._clock.offset()[1])
        return 1 if room >= floor else 1 + math.ceil((floor - room) / self._interval)

    def _learn_pause(self, reply: Reservation, received: float) -> None:
        if reply.paused_us > reply.now_us:
            # Mapped as late as this round trip allows: the pause never ends early here.
            self._paused_until = max(self._paused_until, received + (reply.paused_us - reply.now_us) / 1e6)

    def _load(self, reply: Reservation, cost: int) -> None:
        """Turn the batch into (ripe, expiry) pairs of local time: from `x - tolerance` (not
        before now or the pause) to `x + allowance`, less what we do not know of the clocks."""
        offset, uncertainty = self._clock.offset()
        start = max(reply.now_us, reply.paused_us)
        spacing = cost * self._interval_us
        room = self._room(cost, uncertainty)
        self._batch_len = reply.count
        self._batch_used = self._batch_lost = 0
        for k in range(reply.count):
            earliest = reply.first_us + k * spacing
            ripe = max(start, earliest) / 1e6 + offset
            expiry = earliest / 1e6 + offset + room
            if expiry > ripe:
                self._tokens.append((ripe, expiry))
            else:
                self._batch_lost += 1
                self.stats.lost += 1
