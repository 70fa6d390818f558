"""Provider receipts: Twilio's status callbacks turned into delivery states, kept receipts
applied late, and deliveries that never got one marked `unconfirmed`.

Twilio posts a form to `[providers.twilio].status_callback_base_url` + `/providers/twilio/status`
each time a message or call changes status, signed with `X-Twilio-Signature` (HMAC-SHA1 of the
URL it called and the sorted form fields, keyed by the account's auth token). The signature is
checked with the SDK's `RequestValidator` against the configured public URL, never the request's
Host: behind a proxy the service does not see the URL Twilio signed.

A receipt can arrive before the outcome naming its SID is written (the provider answered, the
outcome waits in the collector's batch). The ledger keeps it; `ReceiptKeeper.run` applies kept
receipts once their delivery exists, and drops, with one log line each, those older than
`[providers.twilio].orphan_receipt_minutes`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import trio
from twilio.request_validator import RequestValidator

from .errors import StoreError
from .ledger import Ledger, ReceiptOutcome
from .providers.twilio import STATUS_CALLBACK_PATH
from .settings import Settings
from .states import RANK, Receipt, ReceiptState

log = logging.getLogger(__name__)

# How often kept receipts are retried and the receipt timeout is checked.
SWEEP_SECONDS = 2.0
# How long a receipt that moves a delivery waits for others to share its write. Twilio posts them
# one request each, spread out; written as they come, each is a round trip of its own (a thread
# hop and pymongo here, ~1 ms of store CPU for one update, ~0.16 ms each in a bulk of 100). Twilio
# waits 15 s for the answer; the answer still follows the write.
GATHER_SECONDS = 0.05
_TIMEOUT_SWEEP_SECONDS = 60.0

# MessageStatus and CallStatus -> the delivery state they report. Statuses missing here
# (`receiving`, `received`, `accepted`, `scheduled`, `partially_delivered`, …) say nothing about
# an outbound message the service created and change nothing.
_MESSAGE_STATES: dict[str, ReceiptState] = {
    "queued": "sent",
    "sending": "sent",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "undelivered",
}
_CALL_STATES: dict[str, ReceiptState] = {
    "queued": "sent",
    "initiated": "sent",
    "ringing": "sent",
    "in-progress": "sent",
    "completed": "delivered",
    "busy": "undelivered",
    "no-answer": "undelivered",
    "failed": "undelivered",
    "canceled": "undelivered",
}
# Call outcomes worth trying again later; every other undelivered call is permanent.
_TEMPORARY_CALL_STATUSES = frozenset({"busy", "no-answer"})
# Twilio messaging error codes that may clear up (handset off, carrier hiccup); others are permanent.
# https://www.twilio.com/docs/api/errors
_TEMPORARY_MESSAGE_CODES = frozenset({"30001", "30003", "30008", "30009", "30010", "30017", "30022"})
_MESSAGE_ERRORS = {
    "30001": "Queue overflow",
    "30002": "Account suspended",
    "30003": "Unreachable destination handset",
    "30004": "Message blocked",
    "30005": "Unknown destination handset",
    "30006": "Landline or unreachable carrier",
    "30007": "Message filtered by the carrier",
    "30008": "Unknown error",
    "21610": "Attempt to send to unsubscribed recipient",
}


class BadReceipt(ValueError):
    """A signed callback that names no message or call."""


def twilio_receipt(form: Mapping[str, str], now: float | None = None, delivery: str | None = None) -> Receipt | None:
    """The receipt a Twilio status callback carries, or None for a status that says nothing
    about delivery. `delivery`: the ledger's delivery id from the callback URL, if any."""
    now = time.time() if now is None else now
    message_sid = form.get("MessageSid") or form.get("SmsSid")
    if message_sid:
        status = (form.get("MessageStatus") or form.get("SmsStatus") or "").lower()
        sid, state = message_sid, _MESSAGE_STATES.get(status)
    elif form.get("CallSid"):
        status = (form.get("CallStatus") or "").lower()
        sid, state = form["CallSid"], _CALL_STATES.get(status)
    else:
        raise BadReceipt("neither MessageSid nor CallSid")
    if state is None:
        return None
    code = form.get("ErrorCode") or None
    if state != "undelivered":
        return Receipt(sid, state, status, now, delivery=delivery)
    if message_sid:
        permanent = status == "failed" or code not in _TEMPORARY_MESSAGE_CODES
        text = form.get("ErrorMessage") or _MESSAGE_ERRORS.get(code or "", "")
        reason = f"Twilio {code}: {text}".rstrip(": ") if code else f"Twilio: message {status}"
    else:
        permanent = status not in _TEMPORARY_CALL_STATUSES
        reason = f"Twilio: call {status}" + (f" (error {code})" if code else "")
    return Receipt(sid, state, status, now, code, reason, permanent, delivery)


class TwilioSignature:
    """Checks `X-Twilio-Signature` against the URL Twilio was told to call."""

    def __init__(self, auth_token: str, public_base_url: str) -> None:
        self._validator = RequestValidator(auth_token)
        self._url = public_base_url.rstrip("/") + STATUS_CALLBACK_PATH

    def valid(self, query_string: str, form: Mapping[str, str], signature: str | None) -> bool:
        if not signature:
            return False
        url = f"{self._url}?{query_string}" if query_string else self._url
        return bool(self._validator.validate(url, dict(form), signature))


def receipt_channels(settings: Settings) -> list[str]:
    """Active channels whose provider sends receipts: Twilio's, once its callback URL is set."""
    if not settings.providers.twilio.status_callback_base_url:
        return []
    return [c for c in settings.channels.active if settings.channels[c].provider == "twilio"]


class ReceiptKeeper:
    """Applies receipts through the ledger, and runs the two sweeps: kept receipts, and the
    receipt timeout. `clock` (epoch seconds) is injectable for tests."""

    def __init__(self, ledger: Ledger, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self._ledger = ledger
        self._gathered_until = 0.0  # trio time: receipts taken before it are written together then
        self._orphan_seconds = settings.providers.twilio.orphan_receipt_minutes * 60
        self._timeout_seconds = settings.ledger.receipt_timeout_hours * 3600
        self._channels = receipt_channels(settings)
        self._clock = clock

    async def take(self, receipts: Sequence[Receipt]) -> ReceiptOutcome:
        """Apply `receipts`; those saying only `sent` (queued, sending, sent, ringing…) cost
        nothing: a delivery holds its SID only from the outcome's write, which already says
        `sent`, so such a receipt could only ever be a duplicate, or kept and later found one.
        About half of what Twilio posts for SMS. The others wait up to `GATHER_SECONDS` for
        those taken meanwhile: they all wake at the same deadline, and the group commit joins
        callers ready in the same tick."""
        moving = [r for r in receipts if RANK[r.state] > RANK["sent"]]
        if not moving:
            return ReceiptOutcome(unchanged=len(receipts))
        now = trio.current_time()
        if self._gathered_until <= now:
            self._gathered_until = now + GATHER_SECONDS
        await trio.sleep_until(self._gathered_until)
        outcome = await self._ledger.apply_receipts(moving)
        outcome.unchanged += len(receipts) - len(moving)
        return outcome

    async def apply_kept(self) -> ReceiptOutcome:
        """Apply kept receipts whose delivery now exists; drop the expired ones."""
        outcome, dropped = await self._ledger.apply_kept_receipts(self._clock() - self._orphan_seconds)
        for kept_id in dropped:
            sid, _, status = kept_id.partition("|")
            log.warning(
                "dropped Twilio receipt %s for %s: no delivery with that id after %g minutes",
                status,
                sid,
                self._orphan_seconds / 60,
            )
        return outcome

    async def time_out(self) -> int:
        """Mark `unconfirmed` what stayed `sent` past the receipt timeout; how many."""
        marked = await self._ledger.mark_unconfirmed(self._channels, self._clock() - self._timeout_seconds)
        if marked:
            log.info("%d deliveries got no receipt within %g hours: unconfirmed", marked, self._timeout_seconds / 3600)
        return marked

    async def run(self) -> None:
        """Sweep until cancelled (only where some channel gives receipts)."""
        if not self._channels:
            return
        next_timeout = trio.current_time()
        while True:
            try:
                await self.apply_kept()
                if trio.current_time() >= next_timeout:
                    await self.time_out()
                    next_timeout = trio.current_time() + _TIMEOUT_SWEEP_SECONDS
            except StoreError as exc:
                log.warning("cannot sweep receipts: %s", exc)
            await trio.sleep(SWEEP_SECONDS)


__all__ = ["BadReceipt", "ReceiptKeeper", "TwilioSignature", "receipt_channels", "twilio_receipt"]
