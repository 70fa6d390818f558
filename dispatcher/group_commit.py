"""Group commit: the writes callers make while one is in flight go together in the next.

Every run of every job marks deliveries `sending`, records outcomes, creates and finishes its job.
One call at a time, that is a store round trip and a worker-thread hop per call: four per
single-recipient send, so at a few hundred sends a second the hops, not the work, would cost the
most. Here a caller queues its write and takes a lock; whoever holds the lock writes everything
queued meanwhile in one thread hop. The number of round trips follows the store's latency, not
the number of callers, across every run of the process.

There is no task of its own to start or stop: a caller cancelled before its write was taken takes
it back, and a write that was taken always completes (a worker thread cannot be interrupted),
so even a shielded caller at shutdown never waits on anyone but the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio


class Write:
    """One caller's part of a group write: `kind` and `payload` say what to write; the flush sets
    `result` or `error` for it."""

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


class GroupCommit:
    def __init__(self, flush: Callable[[list[Write]], None]) -> None:
        """`flush` runs in a worker thread with every queued write and settles each of them."""
        self._flush = flush
        self._queue: list[Write] = []
        self._lock = trio.Lock()

    async def submit(self, kind: str, payload: Any) -> Any:
        """Write `payload` with whatever else is queued; return its result or raise its error."""
        write = Write(kind, payload)
        self._queue.append(write)
        try:
            async with self._lock:
                if not write.done:
                    await self._write_queued()
        except BaseException:
            if write in self._queue:
                self._queue.remove(write)
            raise
        if write.error is not None:
            raise write.error
        return write.result

    async def _write_queued(self) -> None:
        batch, self._queue = self._queue, []
        started = False

        def flush() -> None:
            nonlocal started
            started = True
            self._flush(batch)

        try:
            await trio.to_thread.run_sync(flush)
        except BaseException as exc:
            if not started:  # cancelled before the thread ran: the next holder writes them
                self._queue[:0] = batch
            else:
                for write in batch:
                    if not write.done:
                        write.fail(exc)
            raise
        for write in batch:
            if not write.done:
                write.fail(RuntimeError(f"group commit: no outcome for a {write.kind} write"))


__all__ = ["GroupCommit", "Write"]
