"""Shared round trips: what callers ask of the store while one round trip is in flight goes
together in the next (a group commit, for reads as well as writes).

Every run of every job marks deliveries `sending`, records outcomes, creates and finishes its job,
and a single-recipient send looks its user up. One call at a time, that is a store round trip and
a worker-thread hop per call: five per single-recipient send, so at a few hundred sends a second
the hops, not the work, would cost the most. Here a caller queues its call and takes a lock;
whoever holds the lock runs everything queued meanwhile in one thread hop. The number of round
trips follows the store's latency, not the number of callers, across every run of the process.

There is no task of its own to start or stop: a caller cancelled before its call was taken takes
it back, and a call that was taken always completes (a worker thread cannot be interrupted), so
even a shielded caller at shutdown never waits on anyone but the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio


class Call:
    """One caller's part of a shared round trip: `kind` and `payload` say what to do; the runner
    sets `result` or `error` for it."""

    __slots__ = ("kind", "payload", "result", "error", "done")

    def __init__(self, kind: str, payload: Any) -> None:
        self.kind = kind
        self.payload = payload
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False

    def succeed(self, result: Any = None) -> None:
        self.result, self.done = result, True

    def fail(self, error: BaseException) -> None:
        self.error, self.done = error, True


class Batcher:
    def __init__(self, run: Callable[[list[Call]], None]) -> None:
        """`run` runs in a worker thread with every queued call and settles each of them."""
        self._run = run
        self._queue: list[Call] = []
        self._lock = trio.Lock()

    async def submit(self, kind: str, payload: Any) -> Any:
        """Run `payload` with whatever else is queued; return its result or raise its error."""
        call = Call(kind, payload)
        self._queue.append(call)
        try:
            async with self._lock:
                if not call.done:
                    await self._run_queued()
        except BaseException:
            if call in self._queue:
                self._queue.remove(call)
            raise
        if call.error is not None:
            raise call.error
        return call.result

    async def _run_queued(self) -> None:
        batch, self._queue = self._queue, []
        started = False

        def run() -> None:
            nonlocal started
            started = True
            self._run(batch)

        try:
            await trio.to_thread.run_sync(run)
        except BaseException as exc:
            if not started:  # cancelled before the thread ran: the next holder runs them
                self._queue[:0] = batch
            else:
                for call in batch:
                    if not call.done:
                        call.fail(exc)
            raise
        for call in batch:
            if not call.done:
                call.fail(RuntimeError(f"batching: no outcome for a {call.kind} call"))


__all__ = ["Batcher", "Call"]
