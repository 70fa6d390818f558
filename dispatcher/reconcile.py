"""Reconciliation: resolving an ambiguous attempt by asking the provider, before reporting it.

An attempt is ambiguous when the request may have reached the provider but no answer came back:
the process died during the call (found `sending` on resume), the call timed out, or the
connection broke after the request was written. With `on_ambiguous = "reconcile"` (the default
on Twilio), the provider's own list is asked for what the account created to that number, from
that sender, since the delivery was claimed:

- found (a message with the same body; for calls, a call to that number from that sender) that no
  other delivery in the ledger holds → the delivery is `sent` with that SID (receipts follow);
- not found once the listing has settled → it was never sent, and it is sent now, once;
- the listing fails → `outcome unknown`, as with `report`.

Settling: a listing made too soon after the create proves nothing (Twilio's lists are not
documented to be immediately consistent, and `DateSent` is set once the message left the queue).
The listing is therefore made no sooner than `[providers.twilio].reconcile_settle_seconds` after
the claim; in a running job the delivery waits that long, on resume the crash has usually taken
longer already. The time filter starts `CLOCK_SKEW_SECONDS` before the claim, so that a clock
behind Twilio's does not hide the message.

Lookups take the channel's gate (a concurrency slot and a rate token, like a send) and at most
`[providers.twilio].reconcile_concurrency` run at once per channel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from .errors import DeliveryError, StoreError
from .messages import Message
from .ratelimit import ChannelGate

log = logging.getLogger(__name__)

CLOCK_SKEW_SECONDS = 60.0


class Lookup(Protocol):
    """A provider that can list what it created (`TwilioProvider.find_sent`)."""

    async def find_sent(self, message: Message, address: str, since: float) -> list[str]: ...


class ReconcileError(Exception):
    """The provider could not be asked: the attempt stays ambiguous."""


class Reconciler:
    """Asks one channel's provider whether an ambiguous attempt reached it.

    `taken(sid)` tells whether another delivery already holds that SID (a message with the same
    text to the same number from an earlier send is not this one). `clock` gives epoch seconds.
    """

    def __init__(
        self,
        provider: Lookup,
        gate: ChannelGate,
        settle_seconds: float,
        concurrency: int,
        taken: Callable[[str], Awaitable[bool]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._provider = provider
        self._gate = gate
        self._settle = settle_seconds
        self._slots = trio.Semaphore(concurrency)
        self._taken = taken
        self._clock = clock

    async def find(self, message: Message, address: str, claimed_at: float) -> str | None:
        """The provider's id of the message if it has it, None if it provably has not."""
        wait = claimed_at + self._settle - self._clock()
        if wait > 0:
            await trio.sleep(wait)
        async with self._slots:
            await self._gate.enter()
            try:
                candidates = await self._provider.find_sent(message, address, claimed_at - CLOCK_SKEW_SECONDS)
            except DeliveryError as exc:
                raise ReconcileError(exc.reason) from exc
            finally:
                self._gate.exit()
        for sid in candidates:
            try:
                taken = self._taken is not None and await self._taken(sid)
            except StoreError as exc:
                raise ReconcileError(str(exc)) from exc
            if not taken:
                log.info("reconciled %s for user %s: the provider has it (%s)", message.channel, message.user_id, sid)
                return sid
        log.info("reconciled %s for user %s: never reached the provider", message.channel, message.user_id)
        return None


__all__ = ["CLOCK_SKEW_SECONDS", "Lookup", "ReconcileError", "Reconciler"]
