"""The one interface every delivery provider implements."""

from __future__ import annotations

from typing import Protocol

from ..messages import Message


class Provider(Protocol):
    """Hands one message to one address.

    `send` returns when the provider accepted the message and raises `PermanentDeliveryError` or
    `TransientDeliveryError` (with the provider's code in its reason) when it did not. It does not
    retry, time out or rate-limit: the sender actor does that, the same way for every provider.
    Providers are created once per dispatcher and closed with it.
    """

    name: str

    async def send(self, message: Message, address: str) -> None: ...

    async def aclose(self) -> None: ...
