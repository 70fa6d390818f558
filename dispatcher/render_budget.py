"""A time budget per rendering, enforced off the event loop.

`render_batch` runs a batch of independent jobs (typically `lambda: plan.message_for(user, data)`)
one after the other in ONE worker thread, and interrupts a job that overruns its budget: a
process-wide watchdog thread raises an exception inside the worker with
`PyThreadState_SetAsyncExc`. That stops any loop of Python code (a template's nested `for`); it
cannot stop a single C-level operation, which is why `template_limits` refuses, before computing
them, the operations whose cost grows with an argument.

The budget is the worker thread's CPU time where the platform exposes it (Linux: a job waiting for
the GIL behind other threads is not charged for it), wall time otherwise, with a wall-clock cap in
both cases so that a job blocked without using CPU cannot hold the worker forever.

Where the interrupt may land: the watchdog fires only while a job is marked running (under a
lock), the worker marks the job ending before anything of its own runs, and takes the same lock
to finish it and clear an interrupt still pending, so an interrupt never reaches the next job, the
batch loop or a thread reused by Trio afterwards.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from actors.faults import RenderOverrun

from .errors import RenderError

T = TypeVar("T")

# A job that does not let the interrupt propagate (it swallowed it, or it was raised inside a
# finalizer, whose exceptions Python only prints) is interrupted again this often.
_REFIRE_SECONDS = 0.010
# Budget x this factor (plus five seconds) of wall time stops a job whatever its CPU time. Large on
# purpose: a template cannot block on I/O, so a job short of CPU is only waiting for the GIL, and
# on a loaded machine (the load-test harness on two shared cores) a benign push template waited
# over 20 x 50 ms + 1 s and was failed as hostile.
_WALL_FACTOR = 200.0

_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
# The same function with NULL clears a pending exception of that thread.
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


class RenderBudgetExceeded(RenderError, RenderOverrun):
    """A job ran longer than its budget and was interrupted; that delivery fails."""

    def __init__(self, budget_seconds: float) -> None:
        super().__init__(f"template error: rendering took longer than {budget_seconds * 1000:g} ms")
        self.budget_seconds = budget_seconds


class _Interrupt(BaseException):
    """Raised asynchronously in the worker. A BaseException, so that no `except Exception` on
    the way (Jinja's, a helper's) turns it into an ordinary error and carries on."""


def _cpu_clock(thread_id: int) -> int | None:
    try:
        clock = time.pthread_getcpuclockid(thread_id)
        time.clock_gettime(clock)
    except (AttributeError, OSError):
        return None
    return clock


class _Batch:
    """The jobs of one `render_batch` call and the state the watchdog reads (under its lock)."""

    def __init__(self, jobs: Sequence[Callable[[], T]], budget_seconds: float) -> None:
        self.jobs = jobs
        self.budget = budget_seconds
        self.wall_cap = budget_seconds * _WALL_FACTOR + 5.0
        self._lock = _WATCHDOG.lock
        self._thread_id = 0
        self._clock: int | None = None
        # Guarded by the lock (but `_ending`, also set without it, see `_run_one`): the watchdog
        # fires only while `_running and not _ending`.
        self._running = False
        self._ending = False
        self._cancelled = False
        self._started_cpu = 0.0
        self._started_wall = 0.0
        self._fired_at: float | None = None

    # -- worker side ----------------------------------------------------------------------------

    def run(self) -> list[object]:
        """Run every job in the current thread; a job's `RenderError` (or an overrun) is its
        result, any other exception propagates and stops the batch."""
        self._thread_id = threading.get_ident()
        self._clock = _cpu_clock(self._thread_id)
        results: list[object] = []
        _WATCHDOG.add(self)
        try:
            for job in self.jobs:
                if self._cancelled:
                    break
                ok, value = self._run_one(job)
                if not ok:
                    raise value  # type: ignore[misc]
                results.append(value)
        finally:
            _WATCHDOG.discard(self)
        return results

    def _run_one(self, job: Callable[[], object]) -> tuple[bool, object]:
        # Written for an interrupt that can arrive at any call, function entry or loop jump:
        # from `_begin` on until `_end` holds the lock. `_ending` is set by a plain attribute
        # store (no such point) as soon as the job is over; after that the watchdog fires at most
        # once more (if it was already past its check), which the second `_end` absorbs.
        outcome: tuple[bool, object] | None = None
        try:
            try:
                try:
                    self._begin()
                    outcome = (True, job())
                finally:
                    self._ending = True
            except _Interrupt:
                outcome = None
            except RenderError as exc:
                outcome = (True, exc)
            except BaseException as exc:  # a bug in the job: the caller re-raises it
                outcome = (False, exc)
            self._end()
        except _Interrupt:
            self._end()
        if outcome is None:
            return True, RenderBudgetExceeded(self.budget)
        return outcome

    def _begin(self) -> None:
        with self._lock:
            self._started_cpu = self._cpu_now()
            self._started_wall = time.monotonic()
            self._fired_at = None
            self._ending = False
            self._running = True
            _WATCHDOG.job_started(self._started_wall + min(self.budget, self.wall_cap))

    def _end(self) -> None:
        with self._lock:
            self._running = False
            self._ending = True
            if self._fired_at is not None:
                # Fired, maybe not delivered yet: delivered later it would hit whatever the
                # thread runs next.
                _clear_async_exc(self._thread_id, None)

    def _cpu_now(self) -> float:
        # The worker's CPU clock, read by the worker itself or by the watchdog.
        if self._clock is None:
            return time.monotonic()
        try:
            return time.clock_gettime(self._clock)
        except OSError:  # the thread is gone
            return math.inf

    # -- watchdog side (lock held) --------------------------------------------------------------

    def check(self, now: float) -> float:
        """Interrupt the job if it is due; return when to look at this batch again."""
        if not self._running or self._ending:
            return math.inf
        if self._fired_at is not None:
            if now - self._fired_at >= _REFIRE_SECONDS:
                self._fire(now)
            return self._fired_at + _REFIRE_SECONDS
        used = self._cpu_now() - self._started_cpu if self._clock is not None else now - self._started_wall
        wall = now - self._started_wall
        if self._cancelled or used >= self.budget or wall >= self.wall_cap:
            self._fire(now)
            return now + _REFIRE_SECONDS
        # CPU time cannot advance faster than wall time.
        return now + min(self.budget - used, self.wall_cap - wall)

    def _fire(self, now: float) -> None:
        self._fired_at = now
        _set_async_exc(self._thread_id, _Interrupt)

    def cancel(self) -> None:
        """Stop the batch: interrupt the running job, run no further one (any thread)."""
        with self._lock:
            self._cancelled = True
            if self._running and not self._ending:
                self._fire(time.monotonic())


class _Watchdog:
    """One daemon thread for the whole process, asleep until the earliest deadline of the jobs
    running in any batch (no polling: idle, it waits on its condition forever)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._condition = threading.Condition(self.lock)
        self._batches: set[_Batch] = set()
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf

    def add(self, batch: _Batch) -> None:
        with self.lock:
            self._batches.add(batch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="render-watchdog", daemon=True)
                self._thread.start()

    def discard(self, batch: _Batch) -> None:
        with self.lock:
            self._batches.discard(batch)

    def job_started(self, first_check: float) -> None:
        # Lock held. Jobs of one batch start later and later, so the watchdog only needs waking
        # when it sleeps past this job's first possible deadline.
        if first_check < self._wake_at:
            self._condition.notify()

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                wake = math.inf
                for batch in tuple(self._batches):
                    wake = min(wake, batch.check(now))
                self._wake_at = wake
                self._condition.wait(None if wake == math.inf else max(wake - time.monotonic(), 0.0005))


_WATCHDOG = _Watchdog()


async def render_batch(jobs: Sequence[Callable[[], T]], budget_seconds: float) -> list[T | RenderError]:
    """Run `jobs` in one worker thread (one thread hop for the whole batch), each within
    `budget_seconds`, and return their results in order.

    A job that raises `RenderError` has that error as its result; a job that overruns is
    interrupted and has `RenderBudgetExceeded` as its result. Any other exception is a bug: it
    propagates and the remaining jobs do not run.

    Cancellation: the awaiting task does not abandon the thread (it would go on rendering with
    nobody waiting, outside the thread limiter); instead the running job is interrupted at once,
    the remaining ones are skipped, and `Cancelled` is raised when the thread is back, a few
    milliseconds later at most.
    """
    if not budget_seconds > 0:
        raise ValueError("budget_seconds must be positive")
    batch = _Batch(list(jobs), budget_seconds)
    if not batch.jobs:
        return []
    results: list[object] = []
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_cancellation, batch)
        try:
            results = await trio.to_thread.run_sync(batch.run)
        except Exception as exc:  # re-raised below, outside the nursery: not in an ExceptionGroup
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return results  # type: ignore[return-value]


async def _cancel_on_cancellation(batch: _Batch) -> None:
    try:
        await trio.sleep_forever()
    finally:
        # Also runs once the batch is done (the nursery is cancelled then): a no-op.
        batch.cancel()


__all__ = ["RenderBudgetExceeded", "render_batch"]
