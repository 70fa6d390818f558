"""Process-wide pacing of one channel: a concurrency limit, a token bucket, and a pause that a
provider's 429 imposes on the whole channel.

Provider limits belong to the account, not to a request, so one `ChannelGate` per channel lives
as long as the dispatcher and is shared by every request's sender actor.
"""

from __future__ import annotations

import trio


class TokenBucket:
    """Token bucket of `rate` tokens per second holding at most `burst` (GCRA form).

    Each caller reserves the next free instant and sleeps until it: no lock, no polling, and in any
    window of one second at most `rate + burst` tokens are handed out. `rate == 0` is unlimited.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._tolerance = (self.burst - 1) * self._interval
        self._tat = float("-inf")  # theoretical arrival time of the next token
        self._paused_until = float("-inf")

    def pause_until(self, deadline: float) -> None:
        """Hand out nothing before `deadline` (a provider asked us to back off)."""
        self._paused_until = max(self._paused_until, deadline)

    async def acquire(self) -> None:
        """Wait for a token. Not a checkpoint when one is available at once: the caller has just
        passed one (the concurrency limiter) and is about to do I/O."""
        while True:
            now = trio.current_time()
            if self._paused_until > now:
                await trio.sleep_until(self._paused_until)
                continue
            if self._interval == 0:
                return
            tat = max(self._tat, now)
            start = max(now, tat - self._tolerance)
            self._tat = tat + self._interval
            if start > now:
                await trio.sleep_until(start)
                if self._paused_until > trio.current_time():
                    continue  # a 429 arrived while we waited: our reserved slot is void
            return


class ChannelGate:
    """Concurrency slot, then rate token: the order that keeps a throttled channel from holding
    every slot while it waits. Use as `await gate.enter()` ... `gate.exit()` (in a finally): this
    sits on the per-message path, where an async context manager costs measurably more."""

    def __init__(self, concurrency: int, rate: float, burst: int) -> None:
        self.limiter = trio.CapacityLimiter(concurrency)
        self.bucket = TokenBucket(rate, burst)

    async def enter(self) -> None:
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
