"""SMS and voice calls through the Twilio REST API, with the official `twilio` SDK on Trio.

The SDK builds the requests and parses the answers (`messages.create_async`, `calls.create_async`);
its bundled async HTTP client is aiohttp, which cannot run under Trio, so the SDK is handed
`TrioHttpClient`, an `AsyncHttpClient` on one shared `httpx.AsyncClient`.
"""

from __future__ import annotations

import datetime as dt
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode
from xml.sax.saxutils import escape

import httpx
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from ..errors import ConfigError, DeliveryError, PermanentDeliveryError, TransientDeliveryError
from ..messages import Message, TextContent
from ..sections import TwilioSettings
from .base import current_delivery, may_have_arrived
from .retry_after import parse_retry_after


log = logging.getLogger(__name__)

_THROTTLED_CODE = 20429
# Limits that concern one number, not the account (twilio.com/docs/api/errors): 14107, more than
# 30 messages between one pair of numbers in 30 s (the destination is paused); 21611, the 'From'
# number's queue is full (that sender is paused). Every other 429 (20429) is the account's.
_DESTINATION_LIMIT = 14107
_SENDER_QUEUE_FULL = 21611
# The service's route for Twilio's status callbacks (under `status_callback_base_url`).
STATUS_CALLBACK_PATH = "/providers/twilio/status"
# The query parameter of that URL naming the ledger's delivery (Twilio signs the whole URL).
DELIVERY_PARAM = "d"
# The SDK prefixes every legacy error message with this; the reason reads better without it.
_SDK_PREFIX = "Unable to create record: "


@dataclass(slots=True)
class _Exchange:
    """What the HTTP client saw of the one request made by the current `send`."""

    retry_after: str | None = None


# Many tasks share one client, and an SDK exception carries no headers: each `send` installs its own
# `_Exchange` here (a Trio task has its own context), and the HTTP client fills in the one it finds.
_exchange: ContextVar[_Exchange | None] = ContextVar("twilio_exchange", default=None)


class TrioHttpClient(AsyncHttpClient):
    """The SDK's HTTP client interface on `httpx`, which runs under Trio.

    It sets no timeout of its own unless the SDK passes one: the caller bounds each attempt.
    Cancellation propagates into httpx, which drops the connection it was using.
    """

    def __init__(self, http: httpx.AsyncClient, logger: logging.Logger = log) -> None:
        super().__init__(logger, True, None)
        self.http = http

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        response = await self.http.request(
            method.upper(),
            url,
            # The SDK's interface types its query values as `object`; they are str, int or bool.
            params=params,  # type: ignore[arg-type]
            data=data,
            headers=headers,
            auth=auth,
            follow_redirects=allow_redirects,
            **extra,
        )
        exchange = _exchange.get()
        if exchange is not None:
            exchange.retry_after = response.headers.get("retry-after")
        return Response(response.status_code, response.text, response.headers)

    async def aclose(self) -> None:
        await self.http.aclose()


class TwilioProvider:
    """Sends `sms` messages (Messages API) and `voice` calls (Calls API, the text read aloud by
    TwiML `<Say>`) for one account. One instance serves both channels and many tasks at once."""

    name = "twilio"

    def __init__(self, settings: TwilioSettings) -> None:
        token = settings.auth_token.get_secret_value()
        if not settings.account_sid:
            raise ConfigError("providers.twilio.account_sid: required when a channel uses the twilio provider")
        if not token:
            raise ConfigError(
                "providers.twilio.auth_token: required when a channel uses the twilio provider (set TWILIO_AUTH_TOKEN)"
            )
        # No pool cap: the channel's `concurrency` is the limit, a second one here would hide it.
        self._http = TrioHttpClient(
            httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        )
        # A non-empty `environment` keeps the SDK from reading TWILIO_EDGE/TWILIO_REGION from
        # os.environ: they would rewrite the host, and the configuration alone decides it.
        self._client = Client(
            settings.account_sid,
            token,
            http_client=self._http,
            environment={"TWILIO_ACCOUNT_SID": settings.account_sid},
        )
        self._client.api.base_url = settings.api_base_url.rstrip("/")
        # Where Twilio posts the receipts of what we create (no receipts without it).
        self._callback_url = (
            settings.status_callback_base_url + STATUS_CALLBACK_PATH if settings.status_callback_base_url else ""
        )

    async def send(self, message: Message, address: str) -> str | None:
        """Deliver and return Twilio's SID of the message or call."""
        content = message.content
        if not isinstance(content, TextContent):
            raise TypeError(f"twilio cannot send {type(content).__name__}")
        callback: dict[str, str] = {}
        if self._callback_url:
            delivery = current_delivery.get()
            url = f"{self._callback_url}?{urlencode({DELIVERY_PARAM: delivery})}" if delivery else self._callback_url
            callback["status_callback"] = url
        exchange = _Exchange()
        token = _exchange.set(exchange)
        try:
            if message.channel == "voice":
                twiml = f"<Response><Say>{escape(content.body)}</Say></Response>"
                record = await self._client.calls.create_async(
                    to=address, from_=content.sender, twiml=twiml, **callback
                )
            else:
                record = await self._client.messages.create_async(
                    to=address, from_=content.sender, body=content.body, **callback
                )
        except TwilioException as exc:
            raise _classify(exc, exchange.retry_after, address, content.sender) from exc
        except httpx.TransportError as exc:
            raise TransientDeliveryError(
                f"Twilio connection error: {type(exc).__name__}", ambiguous=may_have_arrived(exc)
            ) from exc
        finally:
            _exchange.reset(token)
        return getattr(record, "sid", None)

    async def find_sent(self, message: Message, address: str, since: float) -> list[str]:
        """The SIDs of what this account created for `message` to `address` since `since` (epoch
        seconds), newest first: messages from its sender with its exact body; calls from its
        sender (a call's TwiML is not in the listing: the number, the sender and the time are
        all there is to match)."""
        content = message.content
        if not isinstance(content, TextContent):
            raise TypeError(f"twilio cannot send {type(content).__name__}")
        after = dt.datetime.fromtimestamp(since, dt.UTC)
        try:
            if message.channel == "voice":
                calls = await self._client.calls.list_async(to=address, from_=content.sender, start_time_after=after)
                return [c.sid for c in calls if c.sid]
            messages = await self._client.messages.list_async(to=address, from_=content.sender, date_sent_after=after)
        except TwilioException as exc:
            raise _classify(exc, None) from exc
        except httpx.TransportError as exc:
            raise TransientDeliveryError(f"Twilio connection error: {type(exc).__name__}") from exc
        return [m.sid for m in messages if m.sid and m.body == content.body]

    async def aclose(self) -> None:
        await self._http.aclose()


def _classify(exc: TwilioException, retry_after: str | None, to: str = "", sender: str = "") -> DeliveryError:
    """429 (or code 20429) and 5xx are transient, every other answer is permanent; a limit about
    one number (14107: this destination, 21611: this sender) throttles that number only."""
    if isinstance(exc, TwilioRestException):
        status, code, text = exc.status, exc.code, str(exc.msg).removeprefix(_SDK_PREFIX)
    elif isinstance(exc, TwilioServiceException):
        status, code, text = exc.status, exc.code, exc.detail or exc.title
    else:  # raised by the SDK itself, not an answer from Twilio
        return PermanentDeliveryError(f"Twilio error: {exc}")
    # Without a code in the body, the SDK puts the HTTP status in `code`.
    if code is None or code == status:
        reason = f"Twilio HTTP {status}"
    else:
        reason = f"Twilio {code}: {text}"
    if code == _DESTINATION_LIMIT:
        return TransientDeliveryError(
            reason, retry_after=parse_retry_after(retry_after), throttled=True, pause_key=f"to:{to}"
        )
    if code == _SENDER_QUEUE_FULL:
        return TransientDeliveryError(
            reason, retry_after=parse_retry_after(retry_after), throttled=True, pause_key=f"from:{sender}"
        )
    if status == 429 or code == _THROTTLED_CODE:
        return TransientDeliveryError(reason, retry_after=parse_retry_after(retry_after), throttled=True)
    if status >= 500:
        return TransientDeliveryError(reason, retry_after=parse_retry_after(retry_after))
    return PermanentDeliveryError(reason)


__all__ = ["DELIVERY_PARAM", "STATUS_CALLBACK_PATH", "TrioHttpClient", "TwilioProvider"]
