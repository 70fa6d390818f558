"""Process-wide pacing of one channel: a concurrency limit, a token bucket, and a pause that a
provider's 429 imposes on the whole channel.

Provider limits belong to the account, not to a request, so one `ChannelGate` per channel lives
as long as the dispatcher and is shared by every request's sender actor.
"""

from __future__ import annotations

from typing import Protocol

import trio


class Bucket(Protocol):
    async def acquire(self) -> None: ...

    def acquire_nowait(self) -> bool:
        """A token now without waiting, if one is due: True; False (nothing taken) when a wait,
        or a round trip (a cluster-wide bucket), would be needed."""
        ...

    def pause_until(self, deadline: float) -> None: ...


class TokenBucket:
    """Token bucket of `rate` tokens per second holding at most `burst` (GCRA form).

    Waiters are served one at a time, in arrival order, and each token is accounted at the instant
    it is actually handed out: if the event loop stalls, late waiters do not all fire at once, so
    any window of one second sees at most `rate + burst` tokens. `rate == 0` is unlimited.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._tolerance = (self.burst - 1) * self._interval
        self._tat = float("-inf")  # theoretical arrival time of the next token
        self._paused_until = float("-inf")
        self._turn = trio.Lock()  # FIFO: the next waiter in line

    def pause_until(self, deadline: float) -> None:
        """Hand out nothing before `deadline` (a provider asked us to back off)."""
        self._paused_until = max(self._paused_until, deadline)

    def acquire_nowait(self) -> bool:
        if self._interval == 0:
            return self._paused_until <= trio.current_time()
        if self._turn.locked():
            return False  # others wait in line: after them
        now = trio.current_time()
        if max(self._paused_until, self._tat - self._tolerance) > now:
            return False
        self._tat = max(self._tat, now) + self._interval  # as `acquire` without a wait
        return True

    async def acquire(self) -> None:
        """Wait for a token. Not a checkpoint when one is available at once: the caller has just
        passed one (the concurrency limiter) and is about to do I/O."""
        if self._interval == 0:
            while self._paused_until > trio.current_time():
                await trio.sleep_until(self._paused_until)
            return
        async with self._turn:
            scheduled = trio.current_time()
            while True:
                now = trio.current_time()
                start = max(now, self._paused_until, self._tat - self._tolerance)
                if start <= now:
                    break
                scheduled = start
                await trio.sleep_until(start)  # then look again: a 429 may have paused us meanwhile
            # Timers fire a little late (epoll counts milliseconds): forgive a waiter's own
            # lateness, up to half an interval, or the rate drifts low. Less than a whole interval
            # keeps any one-second window at most rate + burst; a real stall is not made up for.
            lateness = min(now - scheduled, self._interval / 2)
            self._tat = max(self._tat, now - lateness) + self._interval


class ChannelGate:
    """Concurrency slot, then rate token: a token is spent only when a call can start, so tokens
    are never banked by queued messages and released in a burst when slots free, and no queued
    message slips past a 429's pause with a token taken before it. Use as `await gate.enter()` ...
    `gate.exit()` (in a finally): this sits on the per-message path, where an async context
    manager costs measurably more.

    Before either, a delivery waits out the pauses of what it concerns (its destination, its
    sender): a 429 about one number holds back that number's deliveries, not the channel's.

    `unsettled` bounds the deliveries claimed `sending` in the ledger whose outcome is not
    written yet: the calls in flight (at most `concurrency`) and the outcomes in the group commit
    (the rest). After a crash those are the only ambiguous deliveries of the channel: at most
    twice its concurrency, per process.
    """

    def __init__(self, concurrency: int, rate: float, burst: int, bucket: Bucket | None = None) -> None:
        self.limiter = trio.CapacityLimiter(concurrency)
        self.unsettled = trio.CapacityLimiter(2 * concurrency)
        # In cluster mode, a bucket shared through Redis by every process (dispatcher.cluster).
        self.bucket: Bucket = bucket if bucket is not None else TokenBucket(rate, burst)
        # Pauses of single destinations or senders (`TransientDeliveryError.pause_key`), in this
        # process only: deadline by key, expired ones dropped as others are added.
        self._paused: dict[str, float] = {}

    def pause(self, key: str, deadline: float) -> None:
        """Hold back every delivery concerning `key` until `deadline`."""
        now = trio.current_time()
        if len(self._paused) >= 64:
            self._paused = {k: d for k, d in self._paused.items() if d > now}
        self._paused[key] = max(self._paused.get(key, deadline), deadline)

    def paused_until(self, keys: tuple[str, ...]) -> float:
        """The end of the longest pause among `keys` (-inf when none is paused)."""
        if not self._paused:
            return float("-inf")
        return max((self._paused.get(key, float("-inf")) for key in keys), default=float("-inf"))

    def enter_nowait(self, keys: tuple[str, ...] = ()) -> bool:
        """`enter` when it needs no wait (the common case, per delivery): True with a slot and a
        token taken; False with nothing taken (then `enter`)."""
        if self._paused and self.paused_until(keys) > trio.current_time():
            return False
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            return False
        if self.bucket.acquire_nowait():
            return True
        self.limiter.release()
        return False

    async def enter(self, keys: tuple[str, ...] = ()) -> None:
        while (until := self.paused_until(keys)) > trio.current_time():
            await trio.sleep_until(until)
        try:
            self.limiter.acquire_nowait()  # the common case: a free slot, no scheduling round trip
        except trio.WouldBlock:
            await self.limiter.acquire()
        try:
            await self.bucket.acquire()
        except BaseException:
            self.limiter.release()
            raise

    def exit(self) -> None:
        self.limiter.release()
