"""Delivering one message under its channel's limits: timeout per attempt, capped exponential
backoff with jitter, `Retry-After` honoured, and every outcome turned into a `Delivery` value."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import trio

from .errors import DeliveryError, TransientDeliveryError
from .messages import Delivery, Message
from .providers.base import Provider
from .ratelimit import ChannelGate
from .settings import ChannelSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    timeout: float = 10.0
    initial: float = 0.5
    cap: float = 30.0

    @classmethod
    def from_settings(cls, settings: ChannelSettings) -> "RetryPolicy":
        return cls(settings.max_attempts, settings.timeout_seconds,
                   settings.backoff_initial_seconds, settings.backoff_max_seconds)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Delay before attempt `attempt + 1`: "equal jitter" on a capped exponential, never less
        than the provider's `Retry-After`."""
        ceiling = min(self.cap, self.initial * 2 ** (attempt - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        return max(delay, retry_after or 0.0)


@dataclass(frozen=True, slots=True)
class Transport:
    """Everything a sender actor needs to deliver on one channel."""

    provider: Provider
    gate: ChannelGate
    policy: RetryPolicy


async def deliver(message: Message, transport: Transport) -> Delivery:
    """Send `message` to each of its addresses; one `Delivery` for the (user, channel).

    A user with several device tokens counts as sent only when every token accepted it.
    """
    errors = []
    for address in message.addresses:
        error = await _deliver_one(message, address, transport)
        if error is not None:
            errors.append((address, error))
    if not errors:
        return Delivery(message.user_id, message.channel, "sent")
    if len(message.addresses) == 1:
        return Delivery(message.user_id, message.channel, "failed", errors[0][1])
    detail = "; ".join(f"{_shorten(address)}: {error}" for address, error in errors)
    return Delivery(message.user_id, message.channel, "failed",
                    f"{len(errors)} of {len(message.addresses)} devices failed: {detail}")


async def _deliver_one(message: Message, address: str, transport: Transport) -> str | None:
    policy = transport.policy
    attempt = 0
    while True:
        attempt += 1
        try:
            await transport.gate.enter()
            try:
                # A bare CancelScope rather than fail_after: this runs once per message.
                with trio.CancelScope(deadline=trio.current_time() + policy.timeout) as attempt_scope:
                    await transport.provider.send(message, address)
            finally:
                transport.gate.exit()
            if not attempt_scope.cancelled_caught:
                return None
            error: DeliveryError = TransientDeliveryError(
                f"{transport.provider.name}: no answer within {policy.timeout:g}s")
        except DeliveryError as exc:
            error = exc
        except Exception as exc:
            # A bug in a provider must cost one delivery, not the whole request.
            log.exception("provider %s crashed delivering to user %s", transport.provider.name, message.user_id)
            return f"{transport.provider.name}: internal error ({type(exc).__name__})"
        if not isinstance(error, TransientDeliveryError) or attempt >= policy.max_attempts:
            suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
            return error.reason + suffix
        delay = policy.backoff(attempt, error.retry_after)
        if error.throttled:
            # A 429 is about the account: slow the whole channel, not just this message.
            transport.gate.bucket.pause_until(trio.current_time() + delay)
        log.info("retrying %s for user %s in %.2fs: %s", message.channel, message.user_id, delay, error.reason)
        await trio.sleep(delay)


def _shorten(token: str) -> str:
    return token if len(token) <= 12 else f"{token[:6]}…{token[-4:]}"
