"""The dispatcher: the public, embeddable API behind `POST /send`.

```python
async with open_dispatcher(settings) as d:
    result = await d.send(request)
```

`open_dispatcher` owns everything long-lived (store connection, provider clients, per-channel
limits) and a nursery in which every accepted send runs. A send therefore survives the
cancellation of whoever awaits it (an HTTP client that disconnects), and leaving the block drains
the sends in flight for up to `[dispatcher].drain_timeout_seconds` before cancelling them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import trio

from actors import run_pipeline

from .embedded_store import open_embedded_store
from .errors import InternalError, RequestError, ShuttingDown
from .files import FilesClient
from .messages import EmailOptions
from .models import SendRequest, SendResult
from .plan import RequestPlan, build_plan, template_attachments
from .providers import Provider, open_providers
from .ratelimit import ChannelGate
from .delivery import RetryPolicy, Transport
from .settings import Settings
from .store import Store
from .templating import Renderer

log = logging.getLogger(__name__)


class Dispatcher:
    """Validates and runs sends. Create it with `open_dispatcher`."""

    def __init__(self, settings: Settings, store: Store, providers: Mapping[str, Provider],
                 files: FilesClient | None, nursery: trio.Nursery) -> None:
        self.settings = settings
        self.store = store
        self._files = files
        self._nursery = nursery
        limits = settings.templates
        self._renderer = Renderer(default_locale=limits.default_locale, max_template_chars=limits.max_template_chars,
                                  max_rendered_chars=limits.max_rendered_chars)
        self._transports = {
            channel: Transport(provider, _gate(settings, channel), RetryPolicy.from_settings(
                settings.channels[channel], settings.channels.on_ambiguous(channel)))
            for channel, provider in providers.items()
        }
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._closing = False

    @property
    def in_flight(self) -> int:
        """Sends accepted and not finished yet."""
        return self._in_flight

    async def send(self, request: SendRequest | Mapping[str, Any]) -> SendResult:
        """Validate `request`, deliver it on every requested channel and return the failures.

        Raises `RequestError` (nothing was sent) for an invalid request. Once validation passed,
        the deliveries run in the dispatcher's own nursery: cancelling this call (a client that
        goes away) stops the waiting, not the deliveries.
        """
        if self._closing:
            raise ShuttingDown("the service is shutting down")
        if not isinstance(request, SendRequest):
            request = SendRequest.parse(dict(request))
        plan = await self.prepare(request)
        if self._closing:
            raise ShuttingDown("the service is shutting down")
        outcome: dict[str, Any] = {}
        done = trio.Event()
        self._in_flight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._nursery.start_soon(self._run, plan, outcome, done)
        await done.wait()
        if "error" in outcome:
            raise InternalError("the send failed unexpectedly; see the service log") from outcome["error"]
        if "result" not in outcome:
            raise ShuttingDown("the service shut down before every delivery of this send was attempted")
        return outcome["result"]

    async def prepare(self, request: SendRequest) -> RequestPlan:
        """Every check that can reject the request: channels, template, compilation, attachments."""
        template = None
        if request.template_id is not None:
            template = await self.store.find_template(request.template_id)
            if template is None:
                raise RequestError(f"templateId: no template {request.template_id!r}")
        email_options = None
        if "email" in request.channels:
            email_options = await self._email_options(request, template)
        return build_plan(request, template, self.settings, self._renderer, email_options, self.store.user_id)

    async def _email_options(self, request: SendRequest, template: dict[str, Any] | None) -> EmailOptions:
        names = [*template_attachments(template), *request.email_attachments]
        attachments: tuple = ()
        if names:
            if self._files is None:
                raise RequestError("emailAttachments: no Files Service is configured ([files].url)")
            attachments = await self._files.fetch_all(names)
        return EmailOptions(sender=request.email_sender or self.settings.sender.email,
                            cc=request.email_carbon_copies, bcc=request.email_blind_carbon_copies,
                            attachments=attachments)

    async def _run(self, plan: RequestPlan, outcome: dict[str, Any], done: trio.Event) -> None:
        try:
            outcome["result"] = result = await run_pipeline(
                plan, self.store, self._transports, self.settings.dispatcher.queue_size)
            log.info("send done: %d users, sent %s, skipped %s, failed %s", result.summary.users,
                     result.summary.sent, result.summary.skipped, result.summary.failed)
        except Exception as exc:
            log.exception("send failed")
            outcome["error"] = exc
        finally:
            done.set()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new sends and wait up to `timeout` seconds for those in flight; True if all finished."""
        self._closing = True
        with trio.move_on_after(timeout):
            await self._idle.wait()
        return self._in_flight == 0


def _gate(settings: Settings, channel: str) -> ChannelGate:
    cs = settings.channels[channel]
    return ChannelGate(cs.concurrency, cs.rate_per_second, cs.burst)


@asynccontextmanager
async def open_dispatcher(settings: Settings) -> AsyncIterator[Dispatcher]:
    """Open the store (starting the embedded one when `[store].url` is empty), the providers and
    the dispatcher's nursery; on exit, drain the sends in flight, then close everything."""
    async with AsyncExitStack() as stack:
        url = settings.store.url.get_secret_value()
        if not url:
            url = await stack.enter_async_context(open_embedded_store(settings.store.data_dir))
        store = Store.connect(url, settings.store, settings.user_fields, settings.dispatcher.store_batch_size)
        stack.callback(store.close)
        providers = await stack.enter_async_context(open_providers(settings))
        files = None
        if settings.files.url:
            http = await stack.enter_async_context(
                httpx.AsyncClient(timeout=settings.files.timeout_seconds, follow_redirects=False))
            files = FilesClient(settings.files, http)
        async with trio.open_nursery() as nursery:
            dispatcher = Dispatcher(settings, store, providers, files, nursery)
            try:
                yield dispatcher
            finally:
                timeout = settings.dispatcher.drain_timeout_seconds
                with trio.CancelScope(shield=True):
                    drained = await dispatcher.drain(timeout)
                if not drained:
                    log.warning("%d sends still in flight after %.0fs: cancelling them", dispatcher.in_flight, timeout)
                nursery.cancel_scope.cancel()


__all__ = ["Dispatcher", "InternalError", "open_dispatcher"]
