"""The one interface every delivery provider implements."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

import httpx

from ..messages import Message


class Provider(Protocol):
    """Hands one message to one address.

    `send` returns when the provider accepted the message, with the provider's id for it when it
    gives one (Twilio SID, FCM message name, SMTP Message-ID), and raises
    `PermanentDeliveryError` or `TransientDeliveryError` (with the provider's code in its reason)
    when it did not; a transient error says whether the message may have arrived anyway
    (`ambiguous`). It does not retry, time out or rate-limit: the sender actor does that, the same
    way for every provider. Providers are created once per dispatcher and closed with it.
    """

    name: str

    async def send(self, message: Message, address: str) -> str | None: ...

    async def aclose(self) -> None: ...


# The ledger's id of the delivery the current provider call is for (None without a ledger). The
# sender sets it around each call; a provider whose receipts can carry it (Twilio's StatusCallback
# URL) puts it there, so that a receipt finds its delivery by primary key in one bulk write for
# many receipts, not by the provider's id one store round trip at a time.
current_delivery: ContextVar[str | None] = ContextVar("current_delivery", default=None)


def may_have_arrived(exc: httpx.TransportError) -> bool:
    """Whether an HTTP request may have reached the provider before the error: only a failure
    to connect proves that it did not."""
    return not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
