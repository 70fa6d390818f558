"""What the dispatcher does about callbacks: decide a job's target when it is accepted (SSRF
rules, a signing secret to sign with), tell the outbox which jobs want `delivery.updated`, build
the `job.finished` message that the job's final write carries, and run the sender.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import logging
import time
from typing import Any

import httpx
import pymongo
import trio

from .auth import ApiKeys
from .callback_delivery import CallbackSender
from .callback_outbox import DEFAULT_EVENTS, JOB_FINISHED, CallbackOutbox, Target
from .callback_urls import CheckedTransport, RefusedUrl, check_callback_url
from .callback_views import Callback, CallbackPage
from .errors import NotFound, RequestError, StoreError
from .job_views import JobStatus
from .ledger import Ledger
from .listing import Viewer, decode_cursor
from .models import SendRequest
from .settings import Settings
from .wire import job_json

log = logging.getLogger(__name__)


class JobCallbacks:
    def __init__(self, settings: Settings, outbox: CallbackOutbox, keys: ApiKeys) -> None:
        self.settings = settings.callbacks
        self.outbox = outbox
        self._keys = keys
        self.sender: CallbackSender | None = None

    def secret_of(self, key_id: str | None) -> str | None:
        """The signing secret of a key's callbacks: its own, else the deployment's."""
        key = self._keys.by_id(key_id)
        if key is not None and key.callback_secret:
            return key.callback_secret
        return self.settings.secret.get_secret_value() or None

    async def target_for(self, request: SendRequest, key_id: str | None) -> Target | None:
        """Where the callbacks of a new job go, or None. `RequestError` (400) names what is wrong:
        a refused URL (callback_urls.py), events without a URL, no secret to sign with."""
        url = request.callback_url or self.settings.default_url
        if not url:
            if request.callback_events is not None:
                raise RequestError("callbackEvents: needs a callbackUrl (no [callbacks].default_url is configured)")
            return None
        try:
            await check_callback_url(
                url, allow_http=self.settings.allow_http, allow_private=self.settings.allow_private
            )
        except RefusedUrl as exc:
            if request.callback_url is None:  # the deployment's own default: its mistake, not the client's
                raise RequestError(f"[callbacks].default_url is refused: {exc}") from None
            raise
        if self.secret_of(key_id) is None:
            raise RequestError(
                "callbackUrl: callbacks are signed and no secret is configured "
                "(DISPATCHER_CALLBACK_SECRET, or callback_secret_env= on the API key)"
            )
        return Target(url, request.callback_events or DEFAULT_EVENTS)

    def finished_message(self, job: dict[str, Any], target: Target | None, status: JobStatus) -> list[dict[str, Any]]:
        """The `job.finished` message for a job ending with `status`, if it asked for one: its
        data is the body of `GET /send/{id}`."""
        if target is None or JOB_FINISHED not in target.events:
            return []
        return [
            self.outbox.job_finished(job["_id"], target, job_json(status), job.get("key_id"), job.get("request_id"))
        ]

    def nudge(self) -> None:
        if self.sender is not None:
            self.sender.nudge()

    # -- the API -------------------------------------------------------------------------------

    async def page(self, state: str, viewer: Viewer, limit: int, cursor: str | None) -> CallbackPage:
        """Messages in `state` that `viewer` may see, newest first."""
        docs, next_cursor = await self.outbox.page(
            state, viewer.key_id, limit, decode_cursor(cursor) if cursor is not None else None
        )
        return CallbackPage([Callback.from_doc(doc) for doc in docs], next_cursor)

    async def retry(self, message_id: str, viewer: Viewer) -> Callback:
        """A dead message pending again (`NotFound` for one `viewer` may not see, `RequestError`
        for one that is not dead)."""
        doc = await self.outbox.message(message_id)
        if doc is None or not viewer.sees(doc):
            raise NotFound(f"no callback {message_id!r}")
        if doc["state"] != "dead":
            raise RequestError(f"callback {message_id!r} is {doc['state']}: only dead callbacks are retried")
        revived = await self.outbox.retry(message_id, time.time())
        if revived is None:  # retried by someone else meanwhile
            revived = await self.outbox.message(message_id)
        self.nudge()
        return Callback.from_doc(revived or doc)


@asynccontextmanager
async def open_job_callbacks(
    settings: Settings,
    client: pymongo.MongoClient[dict[str, Any]],
    ledger: Ledger,
    keys: ApiKeys,
    owner: str,
) -> AsyncIterator[JobCallbacks]:
    """The outbox attached to `ledger`, and a sender delivering from it for the duration of the
    block."""
    store = settings.store
    outbox = CallbackOutbox(
        client,
        store.database,
        store.callbacks_collection,
        store.jobs_collection,
        store.deliveries_collection,
        owner=owner,
        lease_seconds=store.lease_seconds,
        batch_size=settings.callbacks.batch_size,
        batch_ms=settings.callbacks.batch_ms,
        max_age_hours=settings.callbacks.max_age_hours,
        retention_days=store.retention_days,
    )
    ledger.attach_outbox(outbox)
    callbacks = JobCallbacks(settings, outbox, keys)
    limits = httpx.Limits(max_connections=settings.callbacks.concurrency)
    timeout = settings.callbacks.timeout_seconds
    async with (
        httpx.AsyncClient(
            follow_redirects=False,
            timeout=timeout,
            # Connections only to addresses the SSRF rules allow, the very ones checked.
            transport=CheckedTransport(limits=limits, allow_private=settings.callbacks.allow_private),
        ) as http,
        trio.open_nursery() as nursery,
    ):
        callbacks.sender = CallbackSender(outbox, settings.callbacks, callbacks.secret_of, owner, http)
        await nursery.start(callbacks.sender.run)
        try:
            yield callbacks
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(settings.callbacks.timeout_seconds):
                try:
                    await outbox.release()
                except StoreError as exc:  # its lease expires instead
                    log.warning("callbacks: the event cursor was not released: %s", exc)


__all__ = ["JobCallbacks", "open_job_callbacks"]
