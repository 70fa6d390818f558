"""Shared round trips: what callers ask of the store while round trips are in flight goes
together in the next (a group commit, for reads as well as writes).

Every run of every job marks deliveries `sending`, records outcomes, creates and finishes its job,
and a single-recipient send looks its user up. One call at a time, that is a store round trip and
a worker-thread hop per call: five per single-recipient send, so at a few hundred sends a second
the hops, not the work, would cost the most. Here a caller queues its call and takes one of
`in_flight` slots; whoever holds a slot runs everything queued meanwhile in one thread hop. The
number of round trips follows the store's latency, not the number of callers, across every run of
the process.

With one round trip at a time, every call waits for the one in flight before its own: a send whose
writes follow one another waits up to two round trips per write. So up to `in_flight` may run at
once, but a round trip starts beside others only while those carry few calls (`beside`): when
the ones in flight are small the process is not busy and a call need not wait; when they are
large (a fan-out) the next group gathers everything queued meanwhile, as with one at a time, and
the store is not asked for more, smaller round trips (measured: three at a time whatever their
size cost a 5,000-user fan-out 12 % of its throughput and 46 % more store CPU per delivery). Groups in flight together are not ordered with each other, so a caller that needs
one write to land before another either awaits the first, or submits both together
(`submit_together`: one group, in order, the second skipped if the first failed: `Call.after`).

There is no task of its own to start or stop: a caller cancelled before its call was taken takes
it back, and a call that was taken always completes (a worker thread cannot be interrupted), so
even a shielded caller at shutdown never waits on anyone but the store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import outcome  # trio's own: what a worker thread hands back


class Call:
    """One caller's part of a shared round trip: `kind` and `payload` say what to do; the runner
    sets `result` or `error` for it. `after`: a call of the same group that must have succeeded
    for this one to be run at all (the runner fails this one otherwise: `blocked`)."""

    __slots__ = ("kind", "payload", "result", "error", "done", "after", "flight")

    def __init__(self, kind: str, payload: Any, after: Call | None = None) -> None:
        self.kind = kind
        self.payload = payload
        self.after = after
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        # Set while a round trip carries the call: the event it sets when it ends.
        self.flight: trio.Event | None = None

    def succeed(self, result: Any = None) -> None:
        self.result, self.done = result, True

    def fail(self, error: BaseException) -> None:
        self.error, self.done = error, True

    def blocked(self) -> bool:
        """Whether the call it depends on failed (or was never run): then this one fails too,
        with that call's error, and must not be run."""
        after = self.after
        if after is None or (after.done and after.error is None):
            return False
        self.fail(after.error or RuntimeError(f"batching: a {self.kind} call ran before the call it follows"))
        return True


class Batcher:
    def __init__(
        self, run: Callable[[list[Call]], None], in_flight: int = 1, beside: int = 0, *, lone_at_once: bool = False
    ) -> None:
        """`run` runs in a worker thread with every queued call and settles each of them; at most
        `in_flight` of its round trips run at once, a round trip beside others only while those
        carry at most `beside` calls in all. `lone_at_once`: an idle batcher (nothing in flight,
        the last round trip carried one caller) runs a caller's calls without waiting a tick for
        others to join; for callers that mostly come alone, not for those woken together."""
        self._run = run
        self._lone_at_once = lone_at_once
        self._queue: list[Call] = []
        self._in_flight = in_flight
        self._beside = beside
        self._groups = 0  # round trips running
        self._calls = 0  # the calls they carry
        self._ended = trio.Event()  # set when a round trip ends (then replaced)
        # One caller at a time (the leader) waits for a slot and runs the queue; the others wait
        # for `_next`: the `flight` of the round trip that takes the queue as it is (set when it
        # ends), or set early when the leader leaves without running it (the next leads then).
        # So a round trip's end wakes its own callers once, not every queued caller in turn.
        self._next = trio.Event()
        self._leader = False
        # Callers whose calls are queued; whether the last round trip carried several callers.
        self._callers = 0
        self._crowded = False

    async def submit(self, kind: str, payload: Any) -> Any:
        """Run `payload` with whatever else is queued; return its result or raise its error."""
        (call,) = await self.submit_together([Call(kind, payload)])
        if call.error is not None:
            raise call.error
        return call.result

    async def submit_together(self, calls: Sequence[Call]) -> Sequence[Call]:
        """Run `calls` in one round trip (in their order in the group); return them settled: each
        holds its own result or error (nothing raised for them)."""
        self._queue.extend(calls)
        self._callers += 1
        leading = joined = False
        try:
            while not all(call.done for call in calls):
                flight = calls[0].flight
                if flight is not None:  # taken by a round trip (or ours, put back)
                    await flight.wait()
                    continue
                if not leading:
                    if self._leader:
                        await self._next.wait()
                        continue
                    self._leader = leading = True
                if self._groups >= self._in_flight or (self._groups and self._calls > self._beside):
                    await self._ended.wait()
                    continue
                if not joined and (self._groups or self._crowded or not self._lone_at_once):
                    # Callers ready in this same tick join the group: worth a pass of the loop
                    # while the batcher is busy. Run at once, a single-recipient send's lookup
                    # and two writes save 3 of its 12 passes (`benchmarks/loop_passes.py`).
                    joined = True
                    await trio.lowlevel.checkpoint()
                    continue
                leading = False  # the queue is taken: the next caller leads the next
                await self._run_queued()
        except BaseException:
            if calls[0] in self._queue:
                self._callers -= 1
            for call in calls:
                if call in self._queue:
                    self._queue.remove(call)
            if leading:  # left before running the queue: another caller must
                self._leader = False
                waiting, self._next = self._next, trio.Event()
                waiting.set()
            raise
        return calls

    async def _run_queued(self) -> None:
        batch, self._queue = self._queue, []
        self._crowded, self._callers = self._callers > 1, 0
        flight, self._next = self._next, trio.Event()
        self._leader = False
        for call in batch:
            call.flight = flight
        started = False
        self._groups += 1
        self._calls += len(batch)

        def run() -> None:
            nonlocal started
            started = True
            self._run(batch)

        try:
            await _in_thread(run)
        except BaseException as exc:
            if not started:  # cancelled before the thread ran: the next slot holder runs them
                for call in batch:
                    call.flight = None
                self._queue[:0] = batch
                self._callers += 1  # at least one caller waits for them again
            else:
                for call in batch:
                    if not call.done:
                        call.fail(exc)
            raise
        finally:
            self._groups -= 1
            self._calls -= len(batch)
            ended, self._ended = self._ended, trio.Event()
            ended.set()
            flight.set()
        for call in batch:
            if not call.done:
                call.fail(RuntimeError(f"batching: no outcome for a {call.kind} call"))


async def _in_thread(fn: Callable[[], None]) -> None:
    """Run `fn` in a worker thread of Trio's cache and wait for it: cancelled before it starts
    (Cancelled raised here), never once it has. What `trio.to_thread.run_sync` does for it, at
    two thirds of its CPU (60 against 90 µs a hop, loop thread 40 against 55; a single send
    makes three): its capacity limiter (one round trip per slot is bound enough), its copy of the
    context variables and its way back in for `trio.from_thread` are of no use to `fn`."""
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def report(result: outcome.Outcome[None]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(fn, report)
    await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


__all__ = ["Batcher", "Call"]
