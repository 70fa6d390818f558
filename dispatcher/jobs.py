"""Jobs: a send accepted, run in the dispatcher's nursery, kept under a lease, finished, and
resumed by whichever instance sees its lease expire after a crash or an outage.

Where jobs are kept is a `Book`: `Recorded` writes them to the ledger (`[store].ledger = true`);
`NotRecorded` is its stand-in for `[store].ledger = false`, as `Unrecorded` is the journal's: no
job id, no idempotency key, no lease, nothing to resume, and every question about a job answers
that jobs are not recorded. `Jobs` runs either the same way.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from . import logs, metrics
from .callback_outbox import Target
from .cancels import CancelWatch
from .context import RunContext
from .errors import (
    Conflict,
    Interrupted,
    InternalError,
    LeaseLost,
    LimiterDown,
    NotFound,
    RequestError,
    ShuttingDown,
    StoreError,
)
from .job_views import JobStatus
from .journal import Journal, Unrecorded
from .ledger import FINAL_STATES, Ledger, body_hash, now_iso
from .listing import EVERYONE, Viewer
from .models import SendRequest, SendResult, Summary, shown
from .plan import RequestPlan

if TYPE_CHECKING:
    from .fanout import SharedFanOut
    from .job_callbacks import JobCallbacks

log = logging.getLogger(__name__)

# How often a waiter polls a job that another instance runs.
_POLL_SECONDS = 0.5
_PURGE_EVERY_SECONDS = 3600.0
_RETRY_INTERRUPTED_SECONDS = 1.0
# A send naming at most this many users (no cluster) claims its first delivery within a user
# lookup and a rendering: its job's creation goes with that claim (`Journal`, `creating`).
_CREATED_WITH_FIRST_CLAIM = 16


@dataclass(eq=False)
class Run:
    """One job being delivered by this process."""

    job_id: str | None
    plan: RequestPlan
    journal: Unrecorded
    result: SendResult = field(default_factory=SendResult)
    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None
    finished: bool = False
    lease_lost: bool = False
    resumed: bool = False
    # Cancelled when another instance has taken the job over (`Recorded.keep_leases`).
    pipeline: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Where its callbacks go (None: nowhere); the job's owner key and request id.
    callback: Target | None = None
    key_id: str | None = None
    request_id: str | None = None


class NotRecorded:
    """The jobs of `[store].ledger = false`."""

    def ledger(self) -> Ledger:
        """The ledger, for a question about a recorded job (`NotFound` here: there are none)."""
        raise NotFound("jobs are not recorded ([store].ledger = false)")

    async def open(
        self,
        request: SendRequest,
        plan: RequestPlan,
        idempotency_key: str | None,
        key_scope: str,
        *,
        awaited: bool = False,
    ) -> tuple[Run | None, str | None]:
        if idempotency_key:
            raise RequestError("Idempotency-Key needs the delivery ledger ([store].ledger = true)")
        return Run(None, plan, Unrecorded()), None

    def track(self, run: Run) -> None:
        return None

    async def running(self, run: Run) -> None:
        return None

    def holding(self, run: Run) -> AbstractContextManager[None]:
        return nullcontext()

    async def created(self, run: Run) -> None:
        return None

    async def finished(self, run: Run, state: str) -> None:
        return None

    async def failed(self, run: Run) -> None:
        return None


class Recorded:
    """The jobs of `[store].ledger = true`, under leases held by `owner`."""

    def __init__(
        self,
        ledger: Ledger,
        lease_seconds: float,
        owner: str,
        on_ambiguous: Mapping[str, str],
        settle_within: Mapping[str, float],
    ) -> None:
        """`on_ambiguous` and `settle_within` by channel, for the journals (`journal.Journal`)."""
        self._ledger = ledger
        self._lease = lease_seconds
        self.owner = owner
        self._on_ambiguous = on_ambiguous
        self._settle_within = settle_within
        # Signed status callbacks (job_callbacks.py), once `open_dispatcher` has opened them.
        self.callbacks: JobCallbacks | None = None
        # The runs whose lease this process holds, and when each was last renewed (or started).
        self._held: dict[Run, float] = {}

    def ledger(self) -> Ledger:
        return self._ledger

    def journal(
        self,
        job_id: str,
        *,
        resumed: bool,
        ended_runs: Collection[str] = (),
        creating: dict[str, Any] | None = None,
        single: bool = False,
    ) -> Journal:
        return Journal(
            self._ledger,
            job_id,
            resumed=resumed,
            on_ambiguous=self._on_ambiguous,
            settle_within=self._settle_within,
            ended_runs=ended_runs,
            creating=creating,
            single=single,
        )

    async def open(
        self,
        request: SendRequest,
        plan: RequestPlan,
        idempotency_key: str | None,
        key_scope: str,
        *,
        awaited: bool = False,
    ) -> tuple[Run | None, str | None]:
        """Record a new job; `(None, id)` when the idempotency key names an earlier one.

        `awaited`: the caller waits for the send to end, and learns its job's id only then (or
        through `created`). A small such send, without an idempotency key or callbacks, does not
        write its job here: its first claim carries it, and the outcome of a send of one delivery
        ends it (`Journal`: two group commits per send instead of four). Otherwise the job is
        written before anything else: its id is handed out at once, the key is bound to it, or its
        callbacks read it."""
        target = await self.callbacks.target_for(request, key_scope or None) if self.callbacks is not None else None
        if target is None and request.callback_url is not None:
            raise RequestError("callbackUrl: callbacks need the delivery ledger ([store].ledger = true)")
        job_id = uuid.uuid4().hex
        body = request.model_dump(mode="json", by_alias=True, exclude={"idempotency_key"})
        request_id = logs.request_id_var.get()
        doc = self._ledger.job_document(
            job_id,
            body,
            self.owner,
            self._lease,
            idempotency_key,
            key_id=key_scope or None,
            request_id=request_id,
            callback=target.to_doc() if target is not None else None,
        )
        deferred = (
            awaited
            and not idempotency_key
            and target is None
            and not request.clusters
            and 0 < len(request.recipients) <= _CREATED_WITH_FIRST_CLAIM
        )
        if not deferred:
            await self._ledger.insert_job(doc)
        if idempotency_key:
            claim = await self._ledger.claim_key(f"{key_scope}\x00{idempotency_key}", body_hash(body), job_id)
            if not claim.ours:
                await self._ledger.delete_job(job_id)
                if not claim.same_body:
                    raise Conflict(
                        f"Idempotency-Key {shown(idempotency_key)} was already used for a different "
                        f"request (job {claim.job_id}); use a new key for a new request"
                    )
                return None, claim.job_id
        single = deferred and len(request.recipients) == 1 and len(request.channels) == 1
        run = Run(job_id, plan, self.journal(job_id, resumed=False, creating=doc if deferred else None, single=single))
        run.callback, run.key_id, run.request_id = target, key_scope or None, request_id
        return run, job_id

    def resumed(self, job_id: str, plan: RequestPlan, doc: dict[str, Any], ended_runs: Collection[str] = ()) -> Run:
        """The run that resumes the job `doc` (claimed by this instance); `ended_runs` are earlier
        runs known to have ended (`journal.Journal`)."""
        journal = self.journal(job_id, resumed=True, ended_runs=ended_runs)
        if doc.get("cancel_requested"):
            journal.cancel()
        run = Run(job_id, plan, journal, resumed=True)
        run.callback, run.key_id, run.request_id = (
            Target.from_doc(doc.get("callback")),
            doc.get("key_id"),
            doc.get("request_id"),
        )
        return run

    def track(self, run: Run) -> None:
        """A run starts here: its callbacks follow it."""
        if self.callbacks is not None and run.job_id is not None:
            self.callbacks.outbox.track(run.job_id, run.callback, run.key_id, run.request_id)

    async def running(self, run: Run) -> None:
        if run.resumed and run.job_id is not None:
            await self._ledger.update_job(run.job_id, state="running", started_at=now_iso())

    @contextmanager
    def holding(self, run: Run) -> Iterator[None]:
        """Keep the run's lease while in this block (`keep_leases` renews it)."""
        self._held[run] = trio.current_time()
        try:
            yield
        finally:
            self._held.pop(run, None)  # gone already if another instance took it over

    async def keep_leases(self) -> None:
        """Renew the lease of every run held here once it is a third of a lease old (with its
        counts so far), and cancel the pipeline of a run another instance took over. One task
        for every run of the process: a task per run cost each single-recipient send a nursery,
        a spawn and a cancelled sleep, 3 of its 18 passes of the loop (`benchmarks/loop_passes.py`);
        a run shorter than a third of a lease is never renewed at all."""
        renewing: set[Run] = set()

        async def renew(run: Run) -> None:
            try:
                await self._renew(run)
            except Exception:
                # A bug here must not end every run of the process with it: this run's lease is
                # tried again at the next check, and lapses (the job is resumed) if it never is.
                log.exception("job %s: renewing its lease failed", run.job_id)
            finally:
                renewing.discard(run)

        async with trio.open_nursery() as nursery:
            while True:
                # Checked every sixth of a lease, a run is renewed when a third to a half of its
                # lease has passed: a renewal never waits for another run's (a store that hangs).
                await trio.sleep(self._lease / 6)
                due = trio.current_time() - self._lease / 3
                for run, since in list(self._held.items()):
                    if since <= due and run not in renewing:
                        renewing.add(run)
                        nursery.start_soon(renew, run)

    async def _renew(self, run: Run) -> None:
        assert run.job_id is not None
        try:
            await self.created(run)  # a lease on no document would be lost
            doc = await self._ledger.renew(run.job_id, self.owner, self._lease, run.result.summary.to_json())
        except StoreError as exc:
            log.warning("job %s: cannot renew its lease: %s", run.job_id, exc)
            return  # tried again at the next check
        if doc is None:
            log.error("job %s: lease lost to another instance; stopping here", run.job_id)
            run.lease_lost = True
            run.pipeline.cancel()
            self._held.pop(run, None)
            return
        if run in self._held:
            self._held[run] = trio.current_time()
        if doc.get("cancel_requested"):
            run.journal.cancel()

    async def created(self, run: Run) -> None:
        """Write the run's job now if no write of it has yet (its id is about to be handed out)."""
        if isinstance(run.journal, Journal):
            await run.journal.create()

    async def finished(self, run: Run, state: str) -> None:
        assert run.job_id is not None
        metrics.observe_job(state)
        if isinstance(run.journal, Journal) and run.journal.finish_written is not None:
            return  # written with its only outcome
        try:
            await self._end(run, state, summary=run.result.summary.to_json(), lease_expires=0)
        except StoreError as exc:
            # Every outcome is recorded: whoever resumes the job settles it from the ledger.
            log.error("job %s finished but cannot be marked %s: %s", run.job_id, state, exc)

    async def failed(self, run: Run) -> None:
        with trio.CancelScope(shield=True), suppress(StoreError):
            await self._end(run, "failed", error="internal error")

    async def _end(self, run: Run, state: str, **fields: Any) -> None:
        """Write a job's final state, with its `job.finished` callback in the same group commit."""
        assert run.job_id is not None
        finished = now_iso()
        callbacks: list[dict[str, Any]] = []
        if self.callbacks is not None and run.callback is not None:
            doc = await self._ledger.job(run.job_id) or {"_id": run.job_id}
            doc = {**doc, "state": state, "finished_at": finished, **fields}
            status = JobStatus.from_doc(doc, receipts=await self._ledger.receipt_counts(run.job_id))
            callbacks = self.callbacks.finished_message(doc, run.callback, status)
        job_id = run.job_id
        await _carrying(
            run,
            lambda doc: self._ledger.update_job(
                job_id, state=state, finished_at=finished, callbacks=callbacks, creating=doc, **fields
            ),
        )
        if callbacks and self.callbacks is not None:
            self.callbacks.nudge()


Book = Recorded | NotRecorded


class Jobs:
    """Runs jobs in `nursery` through `context` (or the shared fan-out, for the large jobs of a
    cluster), and keeps what this process runs."""

    def __init__(
        self,
        book: Book,
        context: RunContext,
        prepare: Callable[[SendRequest], Awaitable[RequestPlan]],
        cancels: CancelWatch,
        nursery: trio.Nursery,
        lease_seconds: float,
    ) -> None:
        self.book = book
        self._context = context
        self._prepare = prepare
        self._cancels = cancels
        self._nursery = nursery
        self._lease = lease_seconds
        # Cluster mode with the ledger: large jobs are shared with the other processes.
        self.fanout: SharedFanOut | None = None
        self.runs: dict[str, Run] = {}
        # Jobs of ours that a store outage interrupted: resumed as soon as the store answers again,
        # not when their lease expires (our lease is still on them); the id of the run it stopped.
        self._interrupted: dict[str, str] = {}
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.closing = False

    async def accept(
        self,
        request: SendRequest | Mapping[str, Any],
        idempotency_key: str | None,
        key_scope: str,
        *,
        awaited: bool = False,
    ) -> tuple[Run | None, str | None]:
        """Validate and start a job; `(None, id)` when the idempotency key names an earlier one.
        `awaited`: the caller waits for its end (`Recorded.open`)."""
        self._refuse_when_closing()
        if not isinstance(request, SendRequest):
            request = SendRequest.parse(dict(request))
        idempotency_key = idempotency_key or request.idempotency_key
        plan = await self._prepare(request)
        self._refuse_when_closing()
        run, job_id = await self.book.open(request, plan, idempotency_key, key_scope, awaited=awaited)
        if run is not None:
            self._start(run)
        return run, job_id

    def _refuse_when_closing(self) -> None:
        if self.closing:
            raise ShuttingDown("the service is shutting down")

    def _start(self, run: Run) -> None:
        run.result.job_id = run.job_id
        self.in_flight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        if run.job_id is not None:
            self.runs[run.job_id] = run
        self.book.track(run)
        with logs.bind(job_id=run.job_id):  # on every line the job's tasks log
            self._nursery.start_soon(self._execute, run)

    async def _execute(self, run: Run) -> None:
        job_id = run.job_id
        with metrics.track_send(), self._cancels.watching(job_id, run.journal):
            try:
                await self.book.running(run)
                metrics.observe_job("running")
                with self.book.holding(run), run.pipeline:
                    fanout = self.fanout
                    if (
                        fanout is not None
                        and job_id is not None
                        and isinstance(run.journal, Journal)
                        and fanout.shares(run.plan.request)
                    ):
                        await fanout.coordinate(job_id, run.plan, run.journal, run.result)
                    else:
                        await self._context.run(run.plan, run.result, run.journal)
                await self._finish(run)
            except LeaseLost:
                run.error = Interrupted(
                    f"another instance took over job {job_id}: it delivers the rest of the send", run.result, job_id
                )
            except (StoreError, LimiterDown) as exc:
                log.error("job %s: %s", job_id, exc)
                if isinstance(exc, LimiterDown) and isinstance(run.journal, Journal):
                    # The store answers: a job not written yet (nothing claimed) is written now, so
                    # that it is resumed like any other instead of reported not attempted.
                    with suppress(StoreError):
                        await run.journal.create()
                written = _written(run)
                if written is not None and not run.lease_lost:
                    # Its pipeline has ended: the resumed run need not wait for its claims.
                    self._interrupted[written] = getattr(run.journal, "run_id", "")
                run.error = Interrupted(_interruption(exc, written), run.result, written)
            except Exception as exc:
                log.exception("send failed (job %s)", job_id)
                run.error = InternalError("the send failed unexpectedly; see the service log")
                run.error.__cause__ = exc
                await self.book.failed(run)
            finally:
                if not run.finished and run.error is None:  # cancelled: the drain window ended
                    written = _written(run)
                    run.error = Interrupted(
                        "the service shut down before every delivery of this send was attempted"
                        + _resume_note(written),
                        run.result,
                        written,
                    )
                run.done.set()
                if job_id is not None:
                    self.runs.pop(job_id, None)
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()

    async def _finish(self, run: Run) -> None:
        summary = run.result.summary
        if run.journal.fault is not None:
            # Left active: once its lease expires, an instance that reaches the store resumes it.
            raise run.journal.fault
        if run.lease_lost:
            raise LeaseLost(f"another instance took over job {run.job_id}")
        run.finished = True
        log.info(
            "send done%s: %d users; sent %s; skipped %s; failed %s",
            f" (job {run.job_id})" if run.job_id else "",
            summary.users,
            _counts(summary.sent),
            _counts(summary.skipped),
            _counts(summary.failed),
        )
        await self.book.finished(run, "cancelled" if run.journal.cancelled else "done")

    async def wait(self, run: Run) -> SendResult:
        await run.done.wait()
        if run.error is not None:
            raise run.error
        return run.result

    async def result_of(self, job_id: str) -> SendResult:
        """The result of a job started earlier (by this process or another): wait for it to end."""
        run = self.runs.get(job_id)
        if run is not None:
            return await self.wait(run)
        while True:
            doc = await self.job(job_id)
            if doc["state"] in FINAL_STATES:
                break
            await trio.sleep(_POLL_SECONDS)
        result = SendResult(summary=Summary.from_json(doc.get("summary") or {}), job_id=job_id)
        result.failures.extend(await self.book.ledger().all_failures(job_id))
        return result

    async def job(self, job_id: str, viewer: Viewer = EVERYONE) -> dict[str, Any]:
        """A job's document (`NotFound` for an unknown id, or one `viewer` may not see)."""
        doc = await self.book.ledger().job(job_id)
        if doc is None or not viewer.sees(doc):
            # Another key's job answers as an unknown one: its id is not confirmed.
            raise NotFound(f"no send {shown(job_id)}")
        return doc

    async def drain(self, timeout: float) -> bool:
        """Refuse new sends, take no more partitions of shared fan-outs, and wait up to `timeout`
        seconds for the jobs and partitions in flight; True if all finished."""
        self.closing = True
        queue = self.fanout.queue if self.fanout is not None else None
        if queue is not None:
            queue.stop_taking()
        with trio.move_on_after(timeout):
            await self._idle.wait()
            if queue is not None:
                await queue.stopped.wait()
        return self.in_flight == 0 and (queue is None or queue.stopped.is_set())

    # -- resuming (recorded jobs only) ----------------------------------------------------------

    async def maintain(self, book: Recorded) -> None:
        """Resume jobs whose owner died (their lease expired), now and every lease period, and
        purge what retention no longer keeps."""
        ledger = book.ledger()
        next_purge = trio.current_time()
        indexed = False
        while not self.closing:
            try:
                if not indexed:  # here, not at start-up: the service starts while the store is down
                    await ledger.ensure_indexes()
                    indexed = True
                for job_id, ended in sorted(self._interrupted.items()):
                    if job_id not in self.runs and not self.closing:
                        await self._resume(book, job_id, ended_runs=(ended,))
                    self._interrupted.pop(job_id, None)
                for job_id in await ledger.orphaned_jobs():
                    if job_id not in self.runs and not self.closing:
                        await self._resume(book, job_id)
                if trio.current_time() >= next_purge:
                    await ledger.purge_expired()
                    next_purge = trio.current_time() + _PURGE_EVERY_SECONDS
            except StoreError as exc:
                log.warning("cannot look for jobs to resume: %s", exc)
            with trio.move_on_after(self._lease):
                while not self._interrupted:  # an interrupted job is retried every second
                    await trio.sleep(_RETRY_INTERRUPTED_SECONDS)
                await trio.sleep(_RETRY_INTERRUPTED_SECONDS)

    async def _resume(self, book: Recorded, job_id: str, ended_runs: Collection[str] = ()) -> None:
        ledger = book.ledger()
        doc = await ledger.claim(job_id, book.owner, self._lease)
        if doc is None:
            return  # another instance was quicker
        try:
            plan = await self._prepare(SendRequest.parse(doc["request"]))
        except RequestError as exc:
            log.error("job %s cannot be resumed: %s", job_id, exc)
            await ledger.update_job(job_id, state="failed", finished_at=now_iso(), error=str(exc))
            return
        log.info("resuming job %s (%s since %s)", job_id, doc["state"], doc.get("started_at") or doc.get("created_at"))
        self._start(book.resumed(job_id, plan, doc, ended_runs))


async def _carrying(run: Run, write: Callable[[dict[str, Any] | None], Awaitable[None]]) -> None:
    """`write`, carrying the creation of the run's job if no write of it has yet."""
    if isinstance(run.journal, Journal):
        await run.journal.carrying(write)
    else:
        await write(None)


def _interruption(exc: StoreError | LimiterDown, job_id: str | None) -> str:
    if isinstance(exc, StoreError):
        return "the store became unavailable during the send" + _resume_note(job_id)
    # Resumed at once, not when the store answers: the job waits for Redis again.
    if job_id is None:
        return f"{exc}: the deliveries that waited for it were not attempted"
    return f"{exc}; job {job_id} goes on and sends the rest once Redis answers"


def _written(run: Run) -> str | None:
    """The run's job id if its job is in the ledger: one never written (a small send stopped
    before its first write carried it) has nothing to resume, and no id to follow."""
    if isinstance(run.journal, Journal) and not run.journal.created:
        return None
    return run.job_id


def _resume_note(job_id: str | None) -> str:
    return f"; job {job_id} resumes when the service can reach its store again" if job_id else ""


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{channel} {n}" for channel, n in counts.items()) or "none"


__all__ = ["Book", "Jobs", "NotRecorded", "Recorded", "Run"]
