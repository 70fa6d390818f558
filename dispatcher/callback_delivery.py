"""Delivering callbacks from the outbox: every process runs `deliver_callbacks`.

Each round it turns the deliveries stamped since the last round into `delivery.updated`
messages (callback_outbox.py), claims due messages with a lease and POSTs each in a task of its own, so a slow or dead receiver holds only its own
messages: at most `[callbacks].per_host_concurrency` POSTs per destination (scheme, host, port)
and `[callbacks].concurrency` in all are in flight, and a message for a host at its bound is not
claimed (it stays due for whoever has room). Deliveries to providers never wait for callbacks:
their writes are the events.

A try: the URL is checked again against the SSRF rules (callback_urls.py: its host is resolved
and checked for the connection, which goes to the checked address), the body is signed
(callback_signing.py) and POSTed without following redirects, within `timeout_seconds`.
- 2xx: delivered.
- 5xx, 408, 429, a timeout or a connection error: tried again after an exponential backoff with
  jitter (`backoff(...)`), or after the 429's `Retry-After` (capped); given up once the message
  is `[callbacks].max_age_hours` old: dead, with the last error.
- Anything else (another 4xx, a 3xx, a refused URL, no signing secret): dead at once.
Dead messages are listed by `GET /callbacks?state=dead` and tried again by
`POST /callbacks/{id}/retry`. Log lines name the message, its job, its host and the outcome,
never the body or the URL's query.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from . import metrics
from .callback_outbox import DELIVERY_UPDATED, CallbackOutbox, host_of, message_body, shown_url
from .callback_signing import signed_headers
from .callback_urls import RefusedUrl, check_form
from .errors import StoreError
from .providers.retry_after import parse_retry_after
from .settings import CallbackSettings

log = logging.getLogger(__name__)

_RETRIED_STATUSES = frozenset({408, 429})
_DEPTH_EVERY_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one try came to: `delivered`, `retry` (after `delay` seconds) or `dead`."""

    kind: str
    error: str | None = None
    delay: float = 0.0


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before try `attempt + 1`: base * 2^(attempt-1), capped, with "equal jitter" (half
    fixed, half random), so tries spread out but never come sooner than half the schedule."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def classify(status: int, headers: Mapping[str, str], attempt: int, settings: CallbackSettings) -> Outcome:
    """The outcome of an HTTP answer to try number `attempt`."""
    if 200 <= status < 300:
        return Outcome("delivered")
    error = f"HTTP {status}"
    if status >= 500 or status in _RETRIED_STATUSES:
        delay = backoff(attempt, settings.backoff_base_seconds, settings.max_backoff_seconds)
        if status == 429:
            hinted = parse_retry_after(headers.get("Retry-After"))
            if hinted is not None:
                delay = min(max(hinted, 0.0), settings.max_retry_after_seconds)
        return Outcome("retry", error, delay)
    if 300 <= status < 400:
        return Outcome("dead", f"{error}: redirects are not followed; configure the final URL")
    return Outcome("dead", f"{error}: refused by the receiver (only 5xx, 408 and 429 are tried again)")


def payload(message: Mapping[str, Any]) -> bytes:
    """The body of a message: `{type, jobId, requestId, timestamp, data}` (callback_outbox.py)."""
    if "body" in message:
        return str(message["body"]).encode("utf-8")
    # Written by a version that kept the events (or the job's status) as they are.
    if message["type"] == DELIVERY_UPDATED:
        data: Any = {"deliveries": message.get("events") or []}
    else:
        data = message.get("data") or {}
    return message_body(
        message["type"], message.get("job") or "", message.get("request_id"), message["created"], data
    ).encode()


class CallbackSender:
    """The state of one process's deliveries: limits per host, the HTTP client, the secrets."""

    def __init__(
        self,
        outbox: CallbackOutbox,
        settings: CallbackSettings,
        secret_of: Callable[[str | None], str | None],
        owner: str,
        http: httpx.AsyncClient,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self._secret_of = secret_of
        self._owner = owner
        self._http = http
        self._in_flight: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()
        self._wake = trio.Event()
        # Long enough for one try and its write; a process that dies holding a message delays it
        # by at most this much.
        self._lease = settings.timeout_seconds * 2 + 2

    def nudge(self) -> None:
        """Look at the outbox now (a job just finished)."""
        self._wake.set()

    def _room_for(self, doc: Mapping[str, Any]) -> bool:
        host = host_of(doc.get("url") or "")
        with self._lock:  # called from the store's worker thread while tasks release
            if self._total >= self.settings.concurrency:
                return False
            if self._in_flight.get(host, 0) >= self.settings.per_host_concurrency:
                return False
            # Counted at once: the claim loop may take several messages for one host.
            self._in_flight[host] = self._in_flight.get(host, 0) + 1
            self._total += 1
            return True

    def _release(self, doc: Mapping[str, Any]) -> None:
        host = host_of(doc.get("url") or "")
        with self._lock:
            self._in_flight[host] -= 1
            if not self._in_flight[host]:
                del self._in_flight[host]
            self._total -= 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled. Store outages are waited out."""
        task_status.started()
        next_depth = 0.0
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()
                now = time.time()
                try:
                    await self.outbox.collect(now)
                    claimed = await self._claim(now)
                    for doc in claimed:
                        nursery.start_soon(self._try, doc)
                    if trio.current_time() >= next_depth:
                        pending, dead = await self.outbox.depth()
                        metrics.CALLBACK_OUTBOX_DEPTH.set(pending)
                        metrics.CALLBACK_DEAD_LETTERS.set(dead)
                        next_depth = trio.current_time() + _DEPTH_EVERY_SECONDS
                except StoreError as exc:
                    log.warning("callbacks: cannot reach the outbox: %s", exc)
                with trio.move_on_after(self.settings.poll_seconds):
                    await self._wake.wait()

    async def _claim(self, now: float) -> list[dict[str, Any]]:
        free = self.settings.concurrency - self._total
        if free <= 0:
            return []
        taken: list[dict[str, Any]] = []

        def accept(doc: Mapping[str, Any]) -> bool:  # in the store's worker thread
            if self._room_for(doc):
                taken.append(dict(doc))
                return True
            return False

        claimed: list[dict[str, Any]] = []
        try:
            claimed = await self.outbox.claim_due(self._owner, now, self._lease, accept, free)
        finally:
            # Room was counted for every message accepted; give back what was not claimed.
            won = {doc["_id"] for doc in claimed}
            for doc in taken:
                if doc["_id"] not in won:
                    self._release(doc)
        return claimed

    async def _try(self, message: dict[str, Any]) -> None:
        try:
            outcome = await self._post(message)
            await self._settle(message, outcome)
        except StoreError as exc:
            # Its lease expires and it is tried again: at least once, never lost.
            log.warning("callback %s: outcome not recorded: %s", message["_id"], exc)
        finally:
            # No wake-up here: a round per finished POST would cost the store two queries each,
            # taken from the deliveries; the next round comes within poll_seconds.
            self._release(message)

    async def _post(self, message: dict[str, Any]) -> Outcome:
        url = message["url"]
        secret = self._secret_of(message.get("key_id"))
        if not secret:
            return Outcome("dead", "no signing secret (DISPATCHER_CALLBACK_SECRET or the key's callback_secret_env)")
        try:
            # The address is checked where the connection is made (callback_urls.CheckedBackend).
            check_form(url, allow_http=self.settings.allow_http)
        except RefusedUrl as exc:
            return Outcome("dead", f"refused: {exc}")
        body = payload(message)
        headers = {
            "content-type": "application/json",
            "user-agent": "trio-dispatcher-callbacks",
            **signed_headers(secret, message["_id"], body, time.time()),
        }
        attempt = message.get("attempts", 0) + 1
        try:
            with trio.fail_after(self.settings.timeout_seconds):
                response = await self._http.post(url, content=body, headers=headers)
        except RefusedUrl as exc:
            return Outcome("dead", f"refused: {exc}")
        except trio.TooSlowError:
            error = f"no answer within {self.settings.timeout_seconds:g}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        else:
            return classify(response.status_code, response.headers, attempt, self.settings)
        delay = backoff(attempt, self.settings.backoff_base_seconds, self.settings.max_backoff_seconds)
        return Outcome("retry", error, delay)

    async def _settle(self, message: dict[str, Any], outcome: Outcome) -> None:
        attempt = message.get("attempts", 0) + 1
        now = time.time()
        kind = outcome.kind
        if kind == "retry" and now + outcome.delay > message["created"] + self.outbox.max_age:
            kind = "dead"
        metrics.observe_callback(message["type"], kind, attempt)
        where = f"{message['type']} {message['_id']} (job {message.get('job')}) to {shown_url(message['url'])}"
        if kind == "delivered":
            log.info("callback %s delivered on try %d", where, attempt)
            await self.outbox.settle(message, state="delivered", attempts=attempt, last_error=None, delivered_at=now)
        elif kind == "retry":
            log.info("callback %s: try %d failed (%s); next in %.1fs", where, attempt, outcome.error, outcome.delay)
            await self.outbox.settle(message, attempts=attempt, last_error=outcome.error, next_at=now + outcome.delay)
        else:
            log.warning("callback %s is dead after %d tries: %s", where, attempt, outcome.error)
            await self.outbox.settle(message, state="dead", attempts=attempt, last_error=outcome.error)


__all__ = ["CallbackSender", "Outcome", "backoff", "classify", "payload"]
