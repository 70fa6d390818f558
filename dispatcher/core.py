"""The dispatcher: the public, embeddable API behind `POST /send`.

```python
async with open_dispatcher(settings) as d:
    result = await d.send(request)            # synchronous: the result once every delivery ended
    job_id = await d.submit(request)          # asynchronous: the job's id at once
    status = await d.status(job_id)
```

`open_dispatcher` owns everything long-lived (store connection, ledger, provider clients,
per-channel limits) and a nursery in which every accepted send runs as a job. A send therefore
survives the cancellation of whoever awaits it (an HTTP client that disconnects), and leaving the
block drains the jobs in flight for up to `[dispatcher].drain_timeout_seconds` before cancelling
them. With the ledger (`[store].ledger`, the default) every job is recorded in MongoDB: a job
that a crash, a shutdown or a store outage interrupted is resumed by whichever instance sees its
lease expire, and deliveries already settled are never attempted again.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import trio

from actors.ports import RenderJobs

from . import logs, metrics
from .channels import CHANNELS
from .context import RunContext
from .embedded_store import SupervisedStore, open_supervised_store
from .cancels import CancelWatch
from .errors import (
    ConfigError,
    Conflict,
    Interrupted,
    InternalError,
    NotFound,
    RequestError,
    ShuttingDown,
    StillRunning,
    StoreError,
)
from .files import FilesClient
from .journal import Journal, Unrecorded
from .ledger import FINAL_STATES, Ledger, body_hash, delivery_view, now_iso
from .callback_outbox import Target
from .listing import EVERYONE, JobPage, JobQuery, Viewer, job_json
from .messages import EmailOptions
from .models import Failure, SendRequest, SendResult, Summary, shown
from .plan import RequestPlan, build_plan, template_attachments
from .receipts import ReceiptKeeper
from .reconcile import Reconciler
from .render_pool import RenderPool
from .providers import Provider, open_providers
from .ratelimit import ChannelGate
from .delivery import RetryPolicy, Transport
from .settings import Settings
from .store import Store
from .templating import Renderer

if TYPE_CHECKING:
    from .job_callbacks import JobCallbacks
    from .cluster import Cluster
    from .fanout import SharedFanOut

log = logging.getLogger(__name__)

# How often a waiter polls a job that another instance runs.
_POLL_SECONDS = 0.5
_PURGE_EVERY_SECONDS = 3600.0
_RETRY_INTERRUPTED_SECONDS = 1.0


@dataclass(eq=False)
class _Run:
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
    # Where its callbacks go (None: nowhere); the job's owner key and request id.
    callback: Target | None = None
    key_id: str | None = None
    request_id: str | None = None


class Dispatcher:
    """Validates and runs sends. Create it with `open_dispatcher`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: Mapping[str, Provider],
        files: FilesClient | None,
        nursery: trio.Nursery,
        ledger: Ledger | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.ledger = ledger
        self.cluster = cluster
        self._files = files
        self._nursery = nursery
        limits = settings.templates
        self._renderer = Renderer(
            default_locale=limits.default_locale,
            max_template_chars=limits.max_template_chars,
            max_rendered_chars=limits.max_rendered_chars,
        )
        self.transports = {
            channel: _transport(settings, channel, provider, cluster, ledger) for channel, provider in providers.items()
        }
        self.render_pool = RenderPool(
            self._renderer.config, limits.max_render_ms / 1000, limits.max_render_memory_mb * 1024 * 1024
        )
        self.on_ambiguous = {channel: settings.channels.on_ambiguous(channel) for channel in providers}
        self.context = RunContext(
            store,
            self.transports,
            settings.dispatcher.queue_size,
            self.render_pool.render_users,
            self.on_ambiguous,
        )
        self.channels = tuple(providers)
        self.receipts = ReceiptKeeper(ledger, settings) if ledger is not None else None
        # Cluster mode with the ledger: large jobs are shared with the other processes.
        self.fanout: SharedFanOut | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._runs: dict[str, _Run] = {}
        # Signed status callbacks (job_callbacks.py); None without the ledger.
        self.callbacks: JobCallbacks | None = None
        # Jobs of ours that a store outage interrupted: resumed as soon as the store answers again,
        # not when their lease expires (our lease is still on them).
        self._interrupted: set[str] = set()
        # The embedded store this process started and supervises, if any (for `/-/healthz`).
        self.embedded_store: SupervisedStore | None = None
        self.cancels = CancelWatch(ledger)
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._closing = False

    @property
    def render_jobs(self) -> RenderJobs:
        """How every run of this dispatcher renders (replaceable: a test wraps it)."""
        return self.context.render_jobs

    @render_jobs.setter
    def render_jobs(self, render_jobs: RenderJobs) -> None:
        self.context.render_jobs = render_jobs

    @property
    def in_flight(self) -> int:
        """Jobs accepted (or resumed) by this process and not finished yet."""
        return self._in_flight

    # -- the public API -------------------------------------------------------------------------

    async def send(
        self,
        request: SendRequest | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        key_scope: str = "",
        wait_seconds: float | None = None,
    ) -> SendResult:
        """Validate `request`, deliver it on every requested channel and return the failures.

        Raises `RequestError` (nothing was sent) for an invalid request, `Conflict` for an
        idempotency key already used with another request, and `Interrupted` (with the partial
        result) when a store outage or a shutdown stopped the send before every delivery was
        attempted. Once validation passed, the deliveries run in the dispatcher's own nursery:
        cancelling this call (a client that goes away) stops the waiting, not the deliveries.
        A key already used with the same request returns that send's result; nothing is sent again.
        `key_scope` names the API key sending: it scopes idempotency keys and owns the job
        (`Viewer`); the result's `job_id` names the job (None without the ledger).
        With `wait_seconds`, a recorded send still running after that long raises `StillRunning`
        (the job goes on; without the ledger there is no job to follow, so the call waits).
        """
        run, job_id = await self._accept(request, idempotency_key, key_scope)
        if wait_seconds is None or job_id is None:
            return await (self._result_of(job_id) if run is None else self._wait(run))
        with trio.move_on_after(wait_seconds):
            return await (self._result_of(job_id) if run is None else self._wait(run))
        raise StillRunning(job_id)

    async def submit(
        self, request: SendRequest | Mapping[str, Any], idempotency_key: str | None = None, key_scope: str = ""
    ) -> str:
        """Accept `request` as a job and return its id at once; follow it with `status`."""
        if self.ledger is None:
            raise RequestError("asynchronous sends need the delivery ledger ([store].ledger = true)")
        _, job_id = await self._accept(request, idempotency_key, key_scope)
        assert job_id is not None
        return job_id

    async def status(self, job_id: str, viewer: Viewer = EVERYONE) -> dict[str, Any]:
        """State, counts and times of a job (`NotFound` for an unknown id, or one `viewer` may
        not see)."""
        doc = await self._job(job_id, viewer)
        run = self._runs.get(job_id)
        summary = run.result.summary.to_json() if run is not None else None
        body = job_json(doc, summary)
        # Receipts keep arriving after the job ended: counted from the deliveries, not the job.
        body["summary"] = {**body["summary"], **await self._require_ledger().receipt_counts(job_id)}
        return body

    async def jobs(self, query: JobQuery, viewer: Viewer = EVERYONE) -> JobPage:
        """One page of the jobs `viewer` may see, newest first (`listing.py`)."""
        docs, cursor = await self._require_ledger().list_jobs(query, viewer)
        page = []
        for doc in docs:
            run = self._runs.get(doc["_id"])
            page.append(job_json(doc, run.result.summary.to_json() if run is not None else None))
        return JobPage(page, cursor)

    async def failures(
        self, job_id: str, after: str | None = None, limit: int = 100, viewer: Viewer = EVERYONE
    ) -> dict[str, Any]:
        """One page of a job's failures, in a stable order; `next` continues after this page."""
        await self._job(job_id, viewer)
        ledger = self._require_ledger()
        docs = await ledger.failures(job_id, after, limit)
        page = [Failure(d["user"], d["channel"], d.get("error") or "failed").to_json() for d in docs]
        return {"id": job_id, "failures": page, "next": docs[-1]["_id"] if len(docs) == limit else None}

    async def deliveries(self, job_id: str, user_id: str, viewer: Viewer = EVERYONE) -> dict[str, Any]:
        """One user's deliveries in a job, one per channel, with their history."""
        await self._job(job_id, viewer)
        docs = await self._require_ledger().deliveries_of(job_id, user_id)
        return {"id": job_id, "userId": user_id, "deliveries": [delivery_view(doc) for doc in docs]}

    async def cancel(self, job_id: str, viewer: Viewer = EVERYONE) -> dict[str, Any]:
        """Stop a job that has not finished: deliveries in flight finish, the rest are cancelled."""
        doc = await self._job(job_id, viewer)
        if doc["state"] not in FINAL_STATES:
            await self._require_ledger().request_cancel(job_id)
            self.cancels.cancel(job_id)  # this process's runs at once; the others' within a poll
        return await self.status(job_id, viewer)

    async def prepare(self, request: SendRequest) -> RequestPlan:
        """Every check that can reject the request: channels, template, compilation, attachments."""
        template = None
        if request.template_id is not None:
            template = await self.store.find_template(request.template_id)
            if template is None:
                log.info(
                    "no template %s in %s (load templates with `dispatcher seed`)",
                    shown(request.template_id),
                    self.settings.store.templates_collection,
                )
                raise RequestError(f"templateId: no template {shown(request.template_id)}")
        email_options = None
        if any(CHANNELS[channel].uses_email_options for channel in request.channels):
            email_options = await self._email_options(request, template)
        return build_plan(request, template, self.settings, self._renderer, email_options, self.store.user_id)

    async def readiness(self) -> dict[str, bool]:
        """What `/-/ready` reports: the store, and Redis in cluster mode (rate-limited channels
        fail closed without it)."""
        checks = {"store": await self.store.ping()}
        if self.cluster is not None:
            checks["redis"] = await self.cluster.ping()
        return checks

    async def drain(self, timeout: float) -> bool:
        """Refuse new sends, take no more partitions of shared fan-outs, and wait up to `timeout`
        seconds for the jobs and partitions in flight; True if all finished."""
        self._closing = True
        queue = self.fanout.queue if self.fanout is not None else None
        if queue is not None:
            queue.stop_taking()
        with trio.move_on_after(timeout):
            await self._idle.wait()
            if queue is not None:
                await queue.stopped.wait()
        return self._in_flight == 0 and (queue is None or queue.stopped.is_set())

    # -- accepting and running jobs -------------------------------------------------------------

    async def _accept(
        self, request: SendRequest | Mapping[str, Any], idempotency_key: str | None, key_scope: str
    ) -> tuple[_Run | None, str | None]:
        """Validate and start a job; `(None, id)` when the idempotency key names an earlier one."""
        self._refuse_when_closing()
        if not isinstance(request, SendRequest):
            request = SendRequest.parse(dict(request))
        idempotency_key = idempotency_key or request.idempotency_key
        plan = await self.prepare(request)
        self._refuse_when_closing()
        if self.ledger is None:
            if idempotency_key:
                raise RequestError("Idempotency-Key needs the delivery ledger ([store].ledger = true)")
            run = _Run(None, plan, Unrecorded())
            self._start(run)
            return run, None
        target = await self.callbacks.target_for(request, key_scope or None) if self.callbacks is not None else None
        if target is None and request.callback_url is not None:
            raise RequestError("callbackUrl: callbacks need the delivery ledger ([store].ledger = true)")
        job_id = uuid.uuid4().hex
        body = request.model_dump(mode="json", by_alias=True, exclude={"idempotency_key"})
        request_id = logs.request_id_var.get()
        await self.ledger.create_job(
            job_id,
            body,
            self.owner,
            self.settings.store.lease_seconds,
            idempotency_key,
            key_id=key_scope or None,
            request_id=request_id,
            callback=target.to_doc() if target is not None else None,
        )
        if idempotency_key:
            claim = await self.ledger.claim_key(f"{key_scope}\x00{idempotency_key}", body_hash(body), job_id)
            if not claim.ours:
                await self.ledger.delete_job(job_id)
                if not claim.same_body:
                    raise Conflict(
                        f"Idempotency-Key {shown(idempotency_key)} was already used for a different "
                        f"request (job {claim.job_id}); use a new key for a new request"
                    )
                return None, claim.job_id
        run = _Run(
            job_id,
            plan,
            Journal(
                self.ledger,
                job_id,
                resumed=False,
                on_ambiguous=self.on_ambiguous,
                settle_within=self.context.settle_within,
            ),
        )
        run.callback, run.key_id, run.request_id = target, key_scope or None, request_id
        self._start(run)
        return run, job_id

    def _start(self, run: _Run) -> None:
        run.result.job_id = run.job_id
        self._in_flight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        if run.job_id is not None:
            self._runs[run.job_id] = run
            if self.callbacks is not None:
                self.callbacks.outbox.track(run.job_id, run.callback, run.key_id, run.request_id)
        with logs.bind(job_id=run.job_id):  # on every line the job's tasks log
            self._nursery.start_soon(self._execute, run)

    async def _execute(self, run: _Run) -> None:
        ledger, job_id = self.ledger, run.job_id
        with metrics.track_send(), self.cancels.watching(job_id, run.journal):
            try:
                if ledger is not None and job_id is not None and run.resumed:
                    await ledger.update_job(job_id, state="running", started_at=now_iso())
                metrics.observe_job("running")
                async with trio.open_nursery() as nursery:
                    if ledger is not None and job_id is not None:
                        nursery.start_soon(self._keep_lease, run, nursery.cancel_scope)
                    if self.fanout is not None and job_id is not None and self.fanout.shares(run.plan.request):
                        assert isinstance(run.journal, Journal)
                        await self.fanout.coordinate(job_id, run.plan, run.journal, run.result)
                    else:
                        await self.context.run(run.plan, run.result, run.journal)
                    nursery.cancel_scope.cancel()
                await self._finish(run)
            except StoreError as exc:
                log.error("job %s: store unavailable: %s", job_id, exc)
                if job_id is not None and not run.lease_lost:
                    self._interrupted.add(job_id)
                run.error = Interrupted(
                    "the store became unavailable during the send" + _resume_note(job_id), run.result, job_id
                )
            except Exception as exc:
                log.exception("send failed (job %s)", job_id)
                run.error = InternalError("the send failed unexpectedly; see the service log")
                run.error.__cause__ = exc
                if ledger is not None and job_id is not None:
                    with trio.CancelScope(shield=True), suppress(StoreError):
                        await self._end_job(run, "failed", error="internal error")
            finally:
                if not run.finished and run.error is None:  # cancelled: the drain window ended
                    run.error = Interrupted(
                        "the service shut down before every delivery of this send was attempted" + _resume_note(job_id),
                        run.result,
                        job_id,
                    )
                run.done.set()
                if job_id is not None:
                    self._runs.pop(job_id, None)
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

    async def _finish(self, run: _Run) -> None:
        summary = run.result.summary
        if run.journal.fault is not None:
            # Left active: once its lease expires, an instance that reaches the store resumes it.
            raise run.journal.fault
        if run.lease_lost:
            raise StoreError("another instance took over the job's lease")
        run.finished = True
        log.info(
            "send done%s: %d users; sent %s; skipped %s; failed %s",
            f" (job {run.job_id})" if run.job_id else "",
            summary.users,
            _counts(summary.sent),
            _counts(summary.skipped),
            _counts(summary.failed),
        )
        if self.ledger is not None and run.job_id is not None:
            state = "cancelled" if run.journal.cancelled else "done"
            metrics.observe_job(state)
            try:
                await self._end_job(run, state, summary=summary.to_json(), lease_expires=0)
            except StoreError as exc:
                # Every outcome is recorded: whoever resumes the job settles it from the ledger.
                log.error("job %s finished but cannot be marked %s: %s", run.job_id, state, exc)

    async def _end_job(self, run: _Run, state: str, **fields: Any) -> None:
        """Write a job's final state, with its `job.finished` callback in the same group commit."""
        assert self.ledger is not None and run.job_id is not None
        finished = now_iso()
        callbacks: list[dict[str, Any]] = []
        if self.callbacks is not None and run.callback is not None:
            doc = await self.ledger.job(run.job_id) or {"_id": run.job_id}
            doc = {**doc, "state": state, "finished_at": finished, **fields}
            body = job_json(doc, fields.get("summary"))
            body["summary"] = {**body["summary"], **await self.ledger.receipt_counts(run.job_id)}
            callbacks = self.callbacks.finished_message(doc, run.callback, body)
        await self.ledger.update_job(run.job_id, state=state, finished_at=finished, callbacks=callbacks, **fields)
        if callbacks and self.callbacks is not None:
            self.callbacks.nudge()

    async def _keep_lease(self, run: _Run, pipeline: trio.CancelScope) -> None:
        assert self.ledger is not None and run.job_id is not None
        lease = self.settings.store.lease_seconds
        while True:
            await trio.sleep(lease / 3)
            try:
                doc = await self.ledger.renew(run.job_id, self.owner, lease, run.result.summary.to_json())
            except StoreError as exc:
                log.warning("job %s: cannot renew its lease: %s", run.job_id, exc)
                continue
            if doc is None:
                log.error("job %s: lease lost to another instance; stopping here", run.job_id)
                run.lease_lost = True
                pipeline.cancel()
                return
            if doc.get("cancel_requested"):
                run.journal.cancel()

    async def _wait(self, run: _Run) -> SendResult:
        await run.done.wait()
        if run.error is not None:
            raise run.error
        return run.result

    async def _result_of(self, job_id: str | None) -> SendResult:
        """The result of a job started earlier (by this process or another): wait for it to end."""
        assert job_id is not None
        run = self._runs.get(job_id)
        if run is not None:
            return await self._wait(run)
        while True:
            doc = await self._job(job_id)
            if doc["state"] in FINAL_STATES:
                break
            await trio.sleep(_POLL_SECONDS)
        result = SendResult(summary=Summary.from_json(doc.get("summary") or {}), job_id=job_id)
        after = None
        while True:
            page = await self.failures(job_id, after, 1000)
            result.failures.extend(Failure(f["userId"], f["channel"], f["error"]) for f in page["failures"])
            after = page["next"]
            if after is None:
                return result

    async def _job(self, job_id: str, viewer: Viewer = EVERYONE) -> dict[str, Any]:
        doc = await self._require_ledger().job(job_id)
        if doc is None or not viewer.sees(doc):
            # Another key's job answers as an unknown one: its id is not confirmed.
            raise NotFound(f"no send {shown(job_id)}")
        return doc

    def _require_ledger(self) -> Ledger:
        if self.ledger is None:
            raise NotFound("jobs are not recorded ([store].ledger = false)")
        return self.ledger

    def _refuse_when_closing(self) -> None:
        if self._closing:
            raise ShuttingDown("the service is shutting down")

    # -- resuming -------------------------------------------------------------------------------

    async def maintain(self) -> None:
        """Resume jobs whose owner died (their lease expired), now and every lease period, and
        purge what retention no longer keeps."""
        assert self.ledger is not None
        lease = self.settings.store.lease_seconds
        next_purge = trio.current_time()
        indexed = False
        while not self._closing:
            try:
                if not indexed:  # here, not at start-up: the service starts while the store is down
                    await self.ledger.ensure_indexes()
                    indexed = True
                for job_id in sorted(self._interrupted):
                    if job_id not in self._runs and not self._closing:
                        await self._resume(job_id)
                    self._interrupted.discard(job_id)
                for job_id in await self.ledger.orphaned_jobs():
                    if job_id not in self._runs and not self._closing:
                        await self._resume(job_id)
                if trio.current_time() >= next_purge:
                    await self.ledger.purge_expired()
                    next_purge = trio.current_time() + _PURGE_EVERY_SECONDS
            except StoreError as exc:
                log.warning("cannot look for jobs to resume: %s", exc)
            with trio.move_on_after(lease):
                while not self._interrupted:  # an interrupted job is retried every second
                    await trio.sleep(_RETRY_INTERRUPTED_SECONDS)
                await trio.sleep(_RETRY_INTERRUPTED_SECONDS)

    async def _resume(self, job_id: str) -> None:
        assert self.ledger is not None
        doc = await self.ledger.claim(job_id, self.owner, self.settings.store.lease_seconds)
        if doc is None:
            return  # another instance was quicker
        try:
            plan = await self.prepare(SendRequest.parse(doc["request"]))
        except RequestError as exc:
            log.error("job %s cannot be resumed: %s", job_id, exc)
            await self.ledger.update_job(job_id, state="failed", finished_at=now_iso(), error=str(exc))
            return
        log.info("resuming job %s (%s since %s)", job_id, doc["state"], doc.get("started_at") or doc.get("created_at"))
        journal = Journal(
            self.ledger, job_id, resumed=True, on_ambiguous=self.on_ambiguous, settle_within=self.context.settle_within
        )
        if doc.get("cancel_requested"):
            journal.cancel()
        run = _Run(job_id, plan, journal, resumed=True)
        run.callback, run.key_id, run.request_id = (
            Target.from_doc(doc.get("callback")),
            doc.get("key_id"),
            doc.get("request_id"),
        )
        self._start(run)

    async def _email_options(self, request: SendRequest, template: dict[str, Any] | None) -> EmailOptions:
        names = [*template_attachments(template), *request.email_attachments]
        attachments: tuple = ()
        if names:
            if self._files is None:
                raise RequestError("emailAttachments: no Files Service is configured ([files].url)")
            attachments = await self._files.fetch_all(names)
        return EmailOptions(
            sender=request.email_sender or self.settings.sender.email,
            cc=request.email_carbon_copies,
            bcc=request.email_blind_carbon_copies,
            attachments=attachments,
        )


def _resume_note(job_id: str | None) -> str:
    return f"; job {job_id} resumes when the service can reach its store again" if job_id else ""


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{channel} {n}" for channel, n in counts.items()) or "none"


def _transport(
    settings: Settings, channel: str, provider: Provider, cluster: Cluster | None, ledger: Ledger | None
) -> Transport:
    on_ambiguous = settings.channels.on_ambiguous(channel)
    gate = _gate(settings, channel, cluster)
    reconciler = None
    if on_ambiguous == "reconcile":
        twilio = settings.providers.twilio
        reconciler = Reconciler(
            provider,  # type: ignore[arg-type]  # settings allow reconcile only where it can look up
            gate,
            twilio.reconcile_settle_seconds,
            twilio.reconcile_concurrency,
            ledger.holds if ledger is not None else None,
        )
    return Transport(provider, gate, RetryPolicy.from_settings(settings.channels[channel], on_ambiguous), reconciler)


def _gate(settings: Settings, channel: str, cluster: Cluster | None) -> ChannelGate:
    cs = settings.channels[channel]
    # In cluster mode every channel's bucket is shared, unlimited ones too: a provider's 429
    # pauses the channel for every process.
    bucket = cluster.bucket(channel, cs.rate_per_second, cs.burst) if cluster is not None else None
    return ChannelGate(cs.concurrency, cs.rate_per_second, cs.burst, bucket)


@asynccontextmanager
async def open_dispatcher(settings: Settings) -> AsyncIterator[Dispatcher]:
    """Open the store (starting the embedded one when `[store].url` is empty), the ledger, the
    providers and the dispatcher's nursery; resume orphaned jobs; on exit, drain the jobs in
    flight, then close everything."""
    async with AsyncExitStack() as stack:
        url = settings.store.url.get_secret_value()
        embedded = None
        if not url:
            embedded = await stack.enter_async_context(open_supervised_store(settings.store.data_dir))
            url = embedded.url
        store = Store.connect(url, settings.store, settings.user_fields, settings.dispatcher.store_batch_size)
        stack.callback(store.close)
        ledger = Ledger(store.client, settings.store) if settings.store.ledger else None
        cluster = None
        if settings.cluster.redis_url.get_secret_value():
            from .cluster import open_cluster

            cluster = await stack.enter_async_context(open_cluster(settings))
        providers = await stack.enter_async_context(open_providers(settings))
        files = None
        if settings.files.url:
            http = await stack.enter_async_context(
                httpx.AsyncClient(timeout=settings.files.timeout_seconds, follow_redirects=False)
            )
            files = FilesClient(settings.files, http)
        async with trio.open_nursery() as nursery:
            dispatcher = Dispatcher(settings, store, providers, files, nursery, ledger, cluster)
            dispatcher.embedded_store = embedded
            nursery.start_soon(store.ensure_indexes)  # best effort, in the background: the store may be down
            if ledger is not None:
                nursery.start_soon(dispatcher.maintain)
                nursery.start_soon(dispatcher.cancels.run)
                nursery.start_soon(dispatcher.receipts.run)  # type: ignore[union-attr]
            if ledger is not None and cluster is not None:
                from .cluster.partitions import PartitionQueue
                from .fanout import SharedFanOut

                dispatcher.fanout = fanout = SharedFanOut(
                    dispatcher.context,
                    dispatcher.prepare,
                    ledger,
                    PartitionQueue.from_cluster(cluster),
                    settings.dispatcher.store_batch_size,
                    dispatcher.cancels,
                )
                await nursery.start(
                    partial(
                        fanout.queue.serve, fanout.deliver, workers=2, claim_idle_seconds=settings.store.lease_seconds
                    )
                )
            async with AsyncExitStack() as running:
                if ledger is not None:
                    from .auth import ApiKeys, load_api_keys
                    from .job_callbacks import open_job_callbacks

                    # Inside the drain: callbacks of the jobs that finish while draining go out too.
                    try:
                        keys = load_api_keys(settings.auth)
                    except ConfigError:  # reported where keys are checked: `serve`'s start, the app
                        keys = ApiKeys([])
                    dispatcher.callbacks = await running.enter_async_context(
                        open_job_callbacks(settings, store.client, ledger, keys, dispatcher.owner)
                    )
                try:
                    yield dispatcher
                finally:
                    timeout = settings.dispatcher.drain_timeout_seconds
                    with trio.CancelScope(shield=True):
                        drained = await dispatcher.drain(timeout)
                    if not drained:
                        log.warning(
                            "%d sends still in flight after %.0fs: cancelling them", dispatcher.in_flight, timeout
                        )
                    nursery.cancel_scope.cancel()


__all__ = ["Dispatcher", "open_dispatcher"]
