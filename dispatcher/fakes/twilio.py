"""A fake Twilio REST API (Messages and Calls) answering the way the real one does.

It checks HTTP Basic auth, the account in the path, the form fields and that `To` is E.164, then
answers from its `Faults`: 201 with a `sid`, 400 code 21610 (permanent), 503 code 20503
(transient), 429 code 20429 with `Retry-After` (throttle), or no answer at all (stall). A
`late` outcome creates the message (it counts as received and is listed) but never answers: the
request reached Twilio, the client times out. A number in `throttled_numbers` is answered 429
code 14107 (that destination's limit) with its `Retry-After`, whatever the faults say.

Like Twilio, it lists what it created (`GET .../Messages.json?To=&From=&DateSent>=`,
`GET .../Calls.json?To=&From=&StartTime>=`) and, for a create with `StatusCallback`, posts
signed status callbacks (`X-Twilio-Signature`) after `receipts.delay`, with final statuses drawn
from `receipts.mix`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

import httpx
import trio
from twilio.request_validator import RequestValidator

from .faults import Faults
from .server import read_body, respond

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_PATH = re.compile(r"/2010-04-01/Accounts/(?P<sid>[^/]+)/(?P<resource>Messages|Calls)\.json")


@dataclass(frozen=True, slots=True)
class TwilioRequest:
    """One request as the fake saw it. `outcome` is the fault applied ("ok", "permanent",
    "transient", "throttle", "stall") or why it was refused ("unauthorized", "not_found", "not_allowed", "invalid")."""

    path: str
    form: dict[str, str]
    time: float  # trio.current_time() on arrival
    outcome: str
    sid: str | None = None

    @property
    def kind(self) -> str:
        return "call" if self.path.endswith("/Calls.json") else "message"


@dataclass
class ReceiptPlan:
    """How the fake answers a StatusCallback: `sent` at once, then after `delay` seconds (fixed or
    a (low, high) range) a final status drawn from `mix` (probabilities of final MessageStatus
    values; the rest `delivered`; calls map delivered -> completed, undelivered -> no-answer,
    failed -> failed). `error_code` goes with undelivered/failed."""

    delay: float | tuple[float, float] = 0.0
    mix: dict[str, float] = field(default_factory=dict)
    error_code: str = "30003"
    seed: int | None = None

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def final(self) -> str:
        draw = self._random.random()
        for status, rate in self.mix.items():
            if draw < rate:
                return status
            draw -= rate
        return "delivered"

    def wait_seconds(self) -> float:
        return self._random.uniform(*self.delay) if isinstance(self.delay, tuple) else self.delay


_CALL_STATUS = {"delivered": "completed", "undelivered": "no-answer", "failed": "failed"}


@dataclass
class FakeTwilio:
    """Raw ASGI app: serve it with `url = await nursery.start(serve_asgi, fake)`.

    `received` holds the requests it accepted (answered 201), `attempts` every request that arrived,
    in order, whatever became of it: tests count retries there.
    """

    account_sid: str
    auth_token: str
    faults: Faults = field(default_factory=Faults)
    received: list[TwilioRequest] = field(default_factory=list)
    attempts: list[TwilioRequest] = field(default_factory=list)
    # 'To' number -> Retry-After seconds: answered 429 code 14107 (per-destination rate limit).
    throttled_numbers: dict[str, float] = field(default_factory=dict)
    receipts: ReceiptPlan = field(default_factory=ReceiptPlan)
    # Every message and call created, as the list routes answer them (with `created`, epoch seconds).
    created: list[dict[str, Any]] = field(default_factory=list)
    # Status callbacks posted (form, HTTP status of the answer, or None when it failed).
    callbacks: list[tuple[dict[str, str], int | None]] = field(default_factory=list)
    callback_times: list[float] = field(default_factory=list)  # trio.current_time() of each answer
    lists: int = 0
    # Answer list requests with 503 (code 20503) instead, to test a provider that cannot be asked.
    lists_fail: bool = False

    def attempts_to(self, number: str) -> list[TwilioRequest]:
        """Every request addressed to `number`."""
        return [request for request in self.attempts if request.form.get("To") == number]

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        path = scope["path"]
        body = await read_body(receive)
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        now = trio.current_time()

        def record(outcome: str, sid: str | None = None) -> TwilioRequest:
            request = TwilioRequest(path, form, now, outcome, sid)
            self.attempts.append(request)
            return request

        if not self._authorized(scope):
            record("unauthorized")
            await _error(send, 401, 20003, "Authenticate")
            return
        match = _PATH.fullmatch(path)
        if match is None or match["sid"] != self.account_sid:
            record("not_found")
            await _error(send, 404, 20404, f"The requested resource {path} was not found")
            return
        if scope["method"] == "GET":
            self.lists += 1
            if self.lists_fail:
                await _error(send, 503, 20503, "Service Unavailable")
                return
            query = dict(parse_qsl(scope.get("query_string", b"").decode(), keep_blank_values=True))
            await respond(send, 200, json.dumps(self._listing(match["resource"], path, query)).encode())
            return
        if scope["method"] != "POST":
            record("not_allowed")
            await _error(send, 405, 20004, "Method not allowed")
            return
        problem = _validate(match["resource"], form)
        if problem is not None:
            record("invalid")
            await _error(send, 400, *problem)
            return

        if form["To"] in self.throttled_numbers:
            record("throttle")
            retry_after = f"{self.throttled_numbers[form['To']]:g}".encode()
            await _error(send, 429, 14107, "SMS send rate limit exceeded", [(b"retry-after", retry_after)])
            return
        outcome: str = self.faults.next_outcome()
        prefix = "SM" if match["resource"] == "Messages" else "CA"
        request = record(outcome, prefix + secrets.token_hex(16) if outcome in ("ok", "late") else None)
        if request.sid is not None:
            self._create(match["resource"], request)
        if outcome == "late":
            self.received.append(request)
            await trio.sleep_forever()  # created, never answered: the client gives up
        await self.faults.wait(outcome)  # type: ignore[arg-type]  # a stall never returns from here
        if outcome == "permanent":
            if match["resource"] == "Messages":
                await _error(send, 400, 21610, "Attempt to send to unsubscribed recipient")
            else:
                await _error(send, 400, 21215, f"Account not authorized to call {form['To']}.")
        elif outcome == "transient":
            await _error(send, 503, 20503, "Service Unavailable")
        elif outcome == "throttle":
            await _error(
                send, 429, 20429, "Too Many Requests", [(b"retry-after", f"{self.faults.retry_after:g}".encode())]
            )
        else:
            assert request.sid is not None
            self.received.append(request)
            payload = _resource(match["resource"], self.account_sid, request.sid, form)
            await respond(send, 201, json.dumps(payload).encode())

    def _create(self, resource: str, request: TwilioRequest) -> None:
        assert request.sid is not None
        payload = _resource(resource, self.account_sid, request.sid, request.form)
        self.created.append({**payload, "created": time.time(), "resource": resource})
        callback = request.form.get("StatusCallback")
        if callback:
            # Outlives the request that created it, as Twilio's callbacks do.
            trio.lowlevel.spawn_system_task(self._report, resource, request.sid, callback)

    async def _report(self, resource: str, sid: str, url: str) -> None:
        """Post `sent`, then the final status, signed as Twilio signs them."""
        final = self.receipts.final()
        if resource == "Messages":
            statuses = ["sent", final]
            key, sid_key = "MessageStatus", "MessageSid"
        else:
            statuses = [_CALL_STATUS[final]]
            key, sid_key = "CallStatus", "CallSid"
        try:
            await trio.sleep(self.receipts.wait_seconds())
            # verify=False: a client that verifies loads the CA bundle, ~26 ms of CPU, once per
            # message here, which made the fake the bottleneck of `loadtest --receipts`; it posts
            # to the service under test, never to a third party.
            async with httpx.AsyncClient(timeout=10, verify=False) as client:
                for status in statuses:
                    form = {sid_key: sid, key: status, "AccountSid": self.account_sid}
                    if status in ("undelivered", "failed", "no-answer") and resource == "Messages":
                        form["ErrorCode"] = self.receipts.error_code
                    for entry in self.created:
                        if entry["sid"] == sid:
                            entry["status"] = status
                    signature = RequestValidator(self.auth_token).compute_signature(url, form)
                    try:
                        answer = await client.post(url, data=form, headers={"X-Twilio-Signature": signature})
                        self.callbacks.append((form, answer.status_code))
                    except httpx.HTTPError:
                        self.callbacks.append((form, None))
                    self.callback_times.append(trio.current_time())
        except Exception:  # a system task must not crash the run: the callback is just lost
            return

    def _listing(self, resource: str, path: str, query: dict[str, str]) -> dict[str, Any]:
        """Twilio's list filters that reconciliation uses: To, From, and the date the message was
        sent (`DateSent>`) or the call started (`StartTime>`), as ISO 8601; here both compare to
        the creation time, to the second."""
        after_key = "DateSent>" if resource == "Messages" else "StartTime>"
        after = _parse_iso(query.get(after_key) or query.get(after_key + "="))
        rows = [
            {k: v for k, v in entry.items() if k not in ("created", "resource")}
            for entry in self.created
            if entry["resource"] == resource
            and entry["to"] == query.get("To", entry["to"])
            and entry["from"] == query.get("From", entry["from"])
            and (after is None or int(entry["created"]) >= after)
        ]
        return {
            resource.lower(): rows,
            "uri": path,
            "first_page_uri": path,
            "next_page_uri": None,
            "previous_page_uri": None,
            "page": 0,
            "page_size": max(len(rows), 50),
            "start": 0,
            "end": max(len(rows) - 1, 0),
        }

    def _authorized(self, scope: dict[str, Any]) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.account_sid) and secrets.compare_digest(password, self.auth_token)


def _parse_iso(value: str | None) -> int | None:
    if not value:
        return None
    return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def _validate(resource: str, form: dict[str, str]) -> tuple[int, str] | None:
    """Twilio's own error code and message for a malformed create, or None."""
    to = form.get("To", "")
    if not to:
        return 21201, "No 'To' number is specified"
    if not form.get("From"):
        return 21603, "A 'From' phone number is required."
    if resource == "Messages" and not form.get("Body"):
        return 21602, "Message body is required."
    if resource == "Calls" and not (form.get("Twiml") or form.get("Url")):
        return 21205, "Url or Twiml is required."
    if not _E164.fullmatch(to):
        return 21211, f"The 'To' number {to} is not a valid phone number."
    return None


def _resource(resource: str, account_sid: str, sid: str, form: dict[str, str]) -> dict[str, Any]:
    now = formatdate(usegmt=True)
    common = {
        "sid": sid,
        "account_sid": account_sid,
        "to": form["To"],
        "from": form["From"],
        "status": "queued",
        "date_created": now,
        "date_updated": now,
        "api_version": "2010-04-01",
        "uri": f"/2010-04-01/Accounts/{account_sid}/{resource}/{sid}.json",
    }
    if resource == "Messages":
        return {
            **common,
            "body": form["Body"],
            "direction": "outbound-api",
            "num_segments": "1",
            "price": None,
            "error_code": None,
            "error_message": None,
        }
    return {**common, "direction": "outbound-api", "price": None}


async def _error(
    send: Callable[[dict[str, Any]], Awaitable[None]],
    status: int,
    code: int,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    await respond(send, status, json.dumps(body).encode(), headers)


__all__ = ["FakeTwilio", "ReceiptPlan", "TwilioRequest"]
