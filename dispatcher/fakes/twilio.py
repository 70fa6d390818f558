"""A fake Twilio REST API (Messages and Calls) answering the way the real one does.

It checks HTTP Basic auth, the account in the path, the form fields and that `To` is E.164, then
answers from its `Faults`: 201 with a `sid`, 400 code 21610 (permanent), 503 code 20503
(transient), 429 code 20429 with `Retry-After` (throttle), or no answer at all (stall). A number
in `throttled_numbers` is answered 429 code 14107 (that destination's limit) with its
`Retry-After`, whatever the faults say.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

import trio

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
        outcome = self.faults.next_outcome()
        prefix = "SM" if match["resource"] == "Messages" else "CA"
        request = record(outcome, prefix + secrets.token_hex(16) if outcome == "ok" else None)
        await self.faults.wait(outcome)  # a stall never returns from here
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


__all__ = ["FakeTwilio", "TwilioRequest"]
