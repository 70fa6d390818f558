"""The dispatcher: the public, embeddable API behind `POST /send`.

```python
async with open_dispatcher(settings) as d:
    result = await d.send(request)            # synchronous: the result once every delivery ended
    job_id = await d.submit(request)          # asynchronous: the job's id at once
    status = await d.status(job_id)           # a JobStatus (job_views.py): .state, .summary, ...
    preview = await d.dry_run(request)        # a DryRun (dryrun.py): what a send would do
```

Every answer is a typed value; the HTTP layer writes them as JSON (`wire.py`).

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
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import trio

from actors.ports import RenderJobs

from .callback_views import Callback, CallbackPage
from .context import RunContext
from .embedded_store import SupervisedStore, open_supervised_store
from .cancels import CancelWatch
from .dryrun import DryRun, dry_run
from .errors import ConfigError, NotFound, RequestError, StillRunning
from .files import FilesClient
from .jobs import Book, Jobs, NotRecorded, Recorded, Run
from .job_views import DeliveryRecord, FailurePage, JobPage, JobStatus, UserDeliveries
from .ledger import FINAL_STATES, Ledger
from .listing import EVERYONE, JobQuery, Viewer
from .models import Failure, SendRequest, SendResult, Summary
from .plan import Planner, RequestPlan
from .receipts import ReceiptKeeper
from .reconcile import Reconciler
from .render_pool import RenderPool
from .providers import Provider, open_providers
from .ratelimit import ChannelGate
from .delivery import RetryPolicy, Transport
from .settings import Settings
from .store import Store

if TYPE_CHECKING:
    from .job_callbacks import JobCallbacks
    from .cluster import Cluster
    from .fanout import SharedFanOut

log = logging.getLogger(__name__)


class Dispatcher:
    """Validates and runs sends, and answers questions about them. Create it with
    `open_dispatcher`. The work is done by its parts: `plan.Planner` plans a request, `jobs.Jobs`
    runs it as a job (`RunContext`: the actors and what they deliver through), the ledger answers
    the queries."""

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
        self.planner = Planner(settings, store, files)
        limits = settings.templates
        self.transports = {
            channel: _transport(settings, channel, provider, cluster, ledger) for channel, provider in providers.items()
        }
        self.render_pool = RenderPool(
            self.planner.renderer.config, limits.max_render_ms / 1000, limits.max_render_memory_mb * 1024 * 1024
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
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # The embedded store this process started and supervises, if any (for `/-/healthz`).
        self.embedded_store: SupervisedStore | None = None
        self.cancels = CancelWatch(ledger)
        lease = settings.store.lease_seconds
        book: Book = (
            Recorded(ledger, lease, self.owner, self.on_ambiguous, self.context.settle_within)
            if ledger is not None
            else NotRecorded()
        )
        self._jobs = Jobs(book, self.context, self.prepare, self.cancels, nursery, lease)

    @property
    def render_jobs(self) -> RenderJobs:
        """How every run of this dispatcher renders (replaceable: a test wraps it)."""
        return self.context.render_jobs

    @render_jobs.setter
    def render_jobs(self, render_jobs: RenderJobs) -> None:
        self.context.render_jobs = render_jobs

    @property
    def fanout(self) -> SharedFanOut | None:
        """Cluster mode with the ledger: large jobs are shared with the other processes."""
        return self._jobs.fanout

    @fanout.setter
    def fanout(self, fanout: SharedFanOut | None) -> None:
        self._jobs.fanout = fanout

    @property
    def callbacks(self) -> JobCallbacks | None:
        """Signed status callbacks (job_callbacks.py); None without the ledger."""
        return self._jobs.book.callbacks if isinstance(self._jobs.book, Recorded) else None

    @callbacks.setter
    def callbacks(self, callbacks: JobCallbacks | None) -> None:
        if isinstance(self._jobs.book, Recorded):
            self._jobs.book.callbacks = callbacks

    @property
    def in_flight(self) -> int:
        """Jobs accepted (or resumed) by this process and not finished yet."""
        return self._jobs.in_flight

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
        run, job_id = await self._jobs.accept(request, idempotency_key, key_scope, awaited=True)
        if wait_seconds is None or job_id is None:
            return await self._outcome(run, job_id)
        with trio.move_on_after(wait_seconds):
            return await self._outcome(run, job_id)
        if run is not None:
            await self._jobs.book.created(run)  # its id is handed out: it must be there to follow
        raise StillRunning(job_id)

    async def _outcome(self, run: Run | None, job_id: str | None) -> SendResult:
        if run is not None:
            return await self._jobs.wait(run)
        assert job_id is not None  # an idempotency key named an earlier job
        return await self._jobs.result_of(job_id)

    async def submit(
        self, request: SendRequest | Mapping[str, Any], idempotency_key: str | None = None, key_scope: str = ""
    ) -> str:
        """Accept `request` as a job and return its id at once; follow it with `status`."""
        if self.ledger is None:
            raise RequestError("asynchronous sends need the delivery ledger ([store].ledger = true)")
        _, job_id = await self._jobs.accept(request, idempotency_key, key_scope)
        assert job_id is not None
        return job_id

    async def status(self, job_id: str, viewer: Viewer = EVERYONE) -> JobStatus:
        """State, counts and times of a job (`NotFound` for an unknown id, or one `viewer` may
        not see)."""
        doc = await self._jobs.job(job_id, viewer)
        # Receipts keep arriving after the job ended: counted from the deliveries, not the job.
        receipts = await self._jobs.book.ledger().receipt_counts(job_id)
        return JobStatus.from_doc(doc, self._live_summary(job_id), receipts)

    async def jobs(self, query: JobQuery, viewer: Viewer = EVERYONE) -> JobPage:
        """One page of the jobs `viewer` may see, newest first (`listing.py`)."""
        docs, cursor = await self._jobs.book.ledger().list_jobs(query, viewer)
        return JobPage([JobStatus.from_doc(doc, self._live_summary(doc["_id"])) for doc in docs], cursor)

    def _live_summary(self, job_id: str) -> Summary | None:
        """The counts of a job this process runs, fresher than its last lease renewal: a copy, as
        they go on changing."""
        run = self._jobs.runs.get(job_id)
        return Summary.from_json(run.result.summary.to_json()) if run is not None else None

    async def failures(
        self, job_id: str, after: str | None = None, limit: int = 100, viewer: Viewer = EVERYONE
    ) -> FailurePage:
        """One page of a job's failures, in a stable order; `next` continues after this page."""
        await self._jobs.job(job_id, viewer)
        docs = await self._jobs.book.ledger().failures(job_id, after, limit)
        page = [Failure(d["user"], d["channel"], d.get("error") or "failed") for d in docs]
        return FailurePage(job_id, page, docs[-1]["_id"] if len(docs) == limit else None)

    async def deliveries(self, job_id: str, user_id: str, viewer: Viewer = EVERYONE) -> UserDeliveries:
        """One user's deliveries in a job, one per channel, with their history."""
        await self._jobs.job(job_id, viewer)
        docs = await self._jobs.book.ledger().deliveries_of(job_id, user_id)
        return UserDeliveries(job_id, user_id, [DeliveryRecord.from_doc(doc) for doc in docs])

    async def cancel(self, job_id: str, viewer: Viewer = EVERYONE) -> JobStatus:
        """Stop a job that has not finished: deliveries in flight finish, the rest are cancelled."""
        doc = await self._jobs.job(job_id, viewer)
        if doc["state"] not in FINAL_STATES:
            await self._jobs.book.ledger().request_cancel(job_id)
            self.cancels.cancel(job_id)  # this process's runs at once; the others' within a poll
        return await self.status(job_id, viewer)

    async def list_callbacks(
        self, state: str = "dead", viewer: Viewer = EVERYONE, limit: int = 50, cursor: str | None = None
    ) -> CallbackPage:
        """One page of the callbacks in `state` (pending, delivered, dead) of the jobs `viewer` may
        see, newest first; `next` continues after this page. `NotFound` without the ledger."""
        return await self._callbacks().page(state, viewer, limit, cursor)

    async def retry_callback(self, callback_id: str, viewer: Viewer = EVERYONE) -> Callback:
        """Make a dead callback pending again, due now, with a fresh age and tries (`NotFound`
        for one `viewer` may not see, `RequestError` for one that is not dead)."""
        return await self._callbacks().retry(callback_id, viewer)

    def _callbacks(self) -> JobCallbacks:
        if self.callbacks is None:
            raise NotFound("callbacks need the delivery ledger ([store].ledger = true)")
        return self.callbacks

    async def dry_run(self, request: SendRequest | Mapping[str, Any], preview_users: int | None = None) -> DryRun:
        """What sending `request` would do, without sending or recording anything (`dryrun.py`):
        the messages of the first `preview_users` users (default `[dispatcher].preview_users`),
        the rest counted. `RequestError` for what a send would refuse."""
        if not isinstance(request, SendRequest):
            request = SendRequest.parse(dict(request))
        if preview_users is None:
            preview_users = self.settings.dispatcher.preview_users
        plan = await self.prepare(request)
        return await dry_run(request, plan, self.store, self.render_jobs, preview_users)

    async def prepare(self, request: SendRequest) -> RequestPlan:
        """Every check that can reject the request: channels, template, compilation, attachments."""
        return await self.planner.prepare(request)

    async def readiness(self) -> dict[str, bool]:
        """What `/-/ready` reports: the store, and Redis in cluster mode (rate-limited channels
        fail closed without it)."""
        checks = {"store": await self.store.ping()}
        if self.cluster is not None:
            checks["redis"] = await self.cluster.ping()
        # A provider that can tell it cannot deliver (the outbox's directory unwritable).
        for provider in {id(t.provider): t.provider for t in self.transports.values()}.values():
            ready = getattr(provider, "ready", None)
            if ready is not None:
                checks[provider.name] = await ready()
        return checks

    async def drain(self, timeout: float) -> bool:
        """Refuse new sends, take no more partitions of shared fan-outs, and wait up to `timeout`
        seconds for the jobs and partitions in flight; True if all finished."""
        return await self._jobs.drain(timeout)

    async def maintain(self) -> None:
        """Resume jobs whose owner died (their lease expired), now and every lease period, and
        purge what retention no longer keeps (with the ledger only)."""
        book = self._jobs.book
        assert isinstance(book, Recorded)
        await self._jobs.maintain(book)

    async def keep_leases(self) -> None:
        """Renew the leases of the jobs this process runs, until the dispatcher closes (with the
        ledger only): through a drain as well, since a job still running must stay ours."""
        book = self._jobs.book
        assert isinstance(book, Recorded)
        await book.keep_leases()


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
        providers = await stack.enter_async_context(open_providers(settings.providers, settings.channels.providers()))
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
                nursery.start_soon(dispatcher.keep_leases)
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
                    settings.store.lease_seconds,
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
