"""Delivering one message under its channel's limits: timeout per attempt, capped exponential
backoff with jitter, `Retry-After` honoured up to a cap, attempts whose outcome is unknown
handled as the channel says, and every outcome turned into a `Delivery` value."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import trio

from . import metrics
from .errors import DeliveryError, TransientDeliveryError
from .journal import STOPPED_DURING_ATTEMPT
from .messages import Delivery, Message
from .providers.base import Provider
from .ratelimit import ChannelGate
from .reconcile import ReconcileError, Reconciler
from .settings import ChannelSettings

log = logging.getLogger(__name__)

UNKNOWN_OUTCOME = "outcome unknown"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    timeout: float = 10.0
    initial: float = 0.5
    cap: float = 30.0
    # A provider asking to wait longer than this fails the delivery now (as throttled).
    max_retry_after: float = 300.0
    # "report": an attempt that may have reached the provider is not repeated; "resend": it is.
    on_ambiguous: str = "report"

    @classmethod
    def from_settings(cls, settings: ChannelSettings, on_ambiguous: str = "report") -> RetryPolicy:
        return cls(
            settings.max_attempts,
            settings.timeout_seconds,
            settings.backoff_initial_seconds,
            settings.backoff_max_seconds,
            settings.max_retry_after_seconds,
            on_ambiguous,
        )

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
    # Asks the provider about ambiguous attempts (`on_ambiguous = "reconcile"`).
    reconciler: Reconciler | None = None


@dataclass(slots=True)
class _Attempts:
    """How the delivery to one address ended."""

    count: int = 0
    error: str | None = None
    kind: str | None = None
    provider_id: str | None = None
    reconciled: str | None = None


async def deliver(message: Message, transport: Transport, reconcile_since: float | None = None) -> Delivery:
    """Send `message` to each of its addresses; one `Delivery` for the (user, channel).

    A user with several device tokens counts as sent only when every token accepted it.
    `reconcile_since`: an earlier run claimed this delivery then (epoch seconds) and stopped
    during the attempt; with a reconciler the provider is asked first, and nothing is sent if it
    has the message.
    """
    outcomes = [await _deliver_one(message, address, transport, reconcile_since) for address in message.addresses]
    attempts = sum(o.count for o in outcomes)
    provider_id = " ".join(o.provider_id for o in outcomes if o.provider_id) or None
    reconciled = next((o.reconciled for o in outcomes if o.reconciled), None)
    failed = [(address, o) for address, o in zip(message.addresses, outcomes) if o.error is not None]
    if not failed:
        return Delivery(
            message.user_id,
            message.channel,
            "sent",
            attempts=attempts,
            provider_id=provider_id,
            reconciled=reconciled,
        )
    if len(message.addresses) == 1:
        error = failed[0][1].error
    else:
        detail = "; ".join(f"{_shorten(address)}: {o.error}" for address, o in failed)
        error = f"{len(failed)} of {len(message.addresses)} devices failed: {detail}"
    return Delivery(
        message.user_id,
        message.channel,
        "failed",
        error,
        attempts=attempts,
        provider_id=provider_id,
        kind=failed[0][1].kind,
        reconciled=reconciled,
    )


async def _deliver_one(
    message: Message, address: str, transport: Transport, reconcile_since: float | None = None
) -> _Attempts:
    policy = transport.policy
    name = transport.provider.name
    result = _Attempts()
    channel = message.channel
    reconciler = transport.reconciler if policy.on_ambiguous == "reconcile" else None
    if reconciler is not None and reconcile_since is not None:
        # An earlier run stopped during this attempt: ask before sending again.
        try:
            result.provider_id = await reconciler.find(message, address, reconcile_since)
        except ReconcileError as exc:
            result.count, result.kind = 1, "ambiguous"
            result.error = f"{STOPPED_DURING_ATTEMPT}; {name} could not be asked whether it has it ({exc})"
            return result
        if result.provider_id is not None:
            result.count, result.reconciled = 1, "found"
            return result
        result.reconciled = "absent"
    while True:
        result.count += 1
        started = trio.current_time()
        claimed_at = time.time()
        try:
            await transport.gate.enter()
            called = trio.current_time()
            metrics.observe_rate_limit_wait(channel, called - started)
            try:
                # A bare CancelScope rather than fail_after: this runs once per message.
                with trio.CancelScope(deadline=called + policy.timeout) as attempt_scope:
                    result.provider_id = await transport.provider.send(message, address)
            finally:
                transport.gate.exit()
            if not attempt_scope.cancelled_caught:
                metrics.observe_attempt(channel, name, trio.current_time() - called, "ok")
                return result
            # The request may have reached the provider: as ambiguous as a crash mid-call.
            error: DeliveryError = TransientDeliveryError(
                f"{name}: no answer within {policy.timeout:g}s", ambiguous=True
            )
        except DeliveryError as exc:
            error = exc
        except Exception as exc:
            # A bug in a provider must cost one delivery, not the whole request.
            log.exception("provider %s crashed delivering to user %s", name, message.user_id)
            metrics.observe_attempt(channel, name, trio.current_time() - started, "internal")
            result.error, result.kind = f"{name}: internal error ({type(exc).__name__})", "internal"
            return result
        result.kind = _kind(error)
        metrics.observe_attempt(
            channel, name, trio.current_time() - started, "timeout" if result.kind == "ambiguous" else result.kind
        )
        suffix = f" (after {result.count} attempts)" if result.count > 1 else ""
        if reconciler is not None and isinstance(error, TransientDeliveryError) and error.ambiguous:
            try:
                result.provider_id = await reconciler.find(message, address, claimed_at)
            except ReconcileError as exc:
                result.error = (
                    f"{UNKNOWN_OUTCOME}: {error.reason}{suffix}; {name} could not be asked whether it has it ({exc})"
                )
                return result
            if result.provider_id is not None:
                result.error, result.kind, result.reconciled = None, None, "found"
                return result
            result.reconciled = "absent"  # provably never sent: sending again duplicates nothing
            if result.count >= policy.max_attempts:
                result.error = f"{error.reason}{suffix}; {name} never received it"
                result.kind = "transient"
                return result
            metrics.observe_retry(channel, name)
            continue
        if not isinstance(error, TransientDeliveryError) or result.count >= policy.max_attempts:
            result.error = error.reason + suffix
            return result
        if error.ambiguous and policy.on_ambiguous == "report":
            result.error = f"{UNKNOWN_OUTCOME}: {error.reason}{suffix}; not retried, it may have been delivered"
            return result
        if error.retry_after is not None and error.retry_after > policy.max_retry_after:
            result.error = (
                f"{error.reason}: throttled, the provider asked to wait {error.retry_after:g}s "
                f"(more than max_retry_after_seconds = {policy.max_retry_after:g}){suffix}"
            )
            result.kind = "throttled"
            return result
        delay = policy.backoff(result.count, error.retry_after)
        if error.throttled:
            # A 429 is about the account: slow the whole channel, not just this message.
            transport.gate.bucket.pause_until(trio.current_time() + delay)
        log.info("retrying %s for user %s in %.2fs: %s", channel, message.user_id, delay, error.reason)
        metrics.observe_retry(channel, name)
        await trio.sleep(delay)


def _kind(error: DeliveryError) -> str:
    if not isinstance(error, TransientDeliveryError):
        return "permanent"
    return "throttled" if error.throttled else "ambiguous" if error.ambiguous else "transient"


def _shorten(token: str) -> str:
    return token if len(token) <= 12 else f"{token[:6]}…{token[-4:]}"
