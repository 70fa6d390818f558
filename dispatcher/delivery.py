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
from .errors import DeliveryError, LimiterDown, LimiterUnavailable, StoreError, TransientDeliveryError
from .journal import Unrecorded
from .messages import Delivery, Message, Status
from .ledger import delivery_key
from .providers.base import Provider, current_delivery
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
    """Everything a sender actor needs to deliver on one channel (`actors.ports.Transport`)."""

    provider: Provider
    gate: ChannelGate
    policy: RetryPolicy
    # Asks the provider about ambiguous attempts (`on_ambiguous = "reconcile"`).
    reconciler: Reconciler | None = None

    @property
    def provider_name(self) -> str:
        return self.provider.name

    @property
    def concurrency(self) -> int:
        """How many of this channel's deliveries may be in flight in this process."""
        return int(self.gate.limiter.total_tokens)

    async def deliver(self, message: Message, journal: Unrecorded) -> Delivery | None:
        return await deliver(message, self, journal)


@dataclass(slots=True)
class _Attempts:
    """How the delivery to one address ended."""

    count: int = 0
    error: str | None = None
    kind: str | None = None
    provider_id: str | None = None
    # An ambiguous attempt resolved by asking the provider: "found" or "absent".
    reconciled: str | None = None


class _Door:
    """One delivery's claim in the ledger, taken at the door: once the delivery holds its slot and
    its token, just before its provider call (so that after a crash only what was on the wire, or
    whose outcome was not written yet, is ambiguous), given back as `retrying` while it waits to
    retry after an attempt that reached no one, and settled by writing its outcome."""

    __slots__ = ("message", "journal", "gate", "claimed", "permit", "sent")

    def __init__(self, message: Message, journal: Unrecorded, gate: ChannelGate) -> None:
        self.message = message
        self.journal = journal
        self.gate = gate
        self.claimed = False  # `sending` in the ledger, for this run
        self.permit = False  # holds one of the channel's `unsettled` permits
        self.sent = False  # some address of the message accepted it

    async def claim(self) -> bool:
        """Take the delivery (and a permit); False when another run holds it or the store failed
        (then the run is stopped: nothing else is sent)."""
        journal = self.journal
        if not self.permit:
            unsettled = self.gate.unsettled
            self.permit = await journal.take(
                lambda: unsettled.acquire_on_behalf_of_nowait(self), lambda: unsettled.acquire_on_behalf_of(self)
            )
            if journal.halted:
                self.give_permit_back()
                return False
        if self.claimed:
            return True
        try:
            taken = await journal.sending([(self.message.channel, self.message.user_id)])
        except StoreError as exc:
            journal.stop(exc)  # every sender of the run sees the fault and stops calling providers
            taken = None
        if journal.fault is not None or taken:
            self.give_permit_back()
            return False
        self.claimed = True
        return True

    async def retrying(self, count: int, reason: str) -> None:
        """The attempt reached no one: the delivery waits for its next without a claim (unless
        another address of it was sent: resending would duplicate that one)."""
        if self.claimed and not self.sent:
            message = self.message
            try:
                await self.journal.retrying(
                    Delivery(message.user_id, message.channel, "failed", reason, attempts=count)
                )
                self.claimed = False
            except StoreError as exc:
                self.journal.stop(exc)
        self.give_permit_back()

    async def settle(self, delivery: Delivery) -> Delivery:
        """Write the outcome of a claimed delivery at once (through the group commit), then give
        its permit back."""
        try:
            if self.claimed and self.journal.fault is None:
                try:
                    await self.journal.record([delivery])
                    delivery = _written(delivery)
                except StoreError as exc:
                    log.error("cannot record the outcome of job %s: %s", self.journal.job_id, exc)
                    self.journal.stop(exc)
        finally:
            self.give_permit_back()
        return delivery

    def give_permit_back(self) -> None:
        if self.permit:
            self.permit = False
            self.gate.unsettled.release_on_behalf_of(self)


async def deliver(message: Message, transport: Transport, journal: Unrecorded | None = None) -> Delivery | None:
    """Send `message` to each of its addresses; one `Delivery` for the (user, channel), its outcome
    already written to the ledger when it was claimed there. None when it was not attempted here:
    another run of the job holds it, or the store failed (`journal.fault`; a resumed run sends it).

    A user with several device tokens counts as sent only when every token accepted it. A cancel
    of the run ends every wait before a provider call at once (`cancelled`, or a failure naming
    the attempts made when some were).
    """
    journal = journal if journal is not None else Unrecorded()
    door = _Door(message, journal, transport.gate)
    in_flight = metrics.deliveries_in_flight(message.channel)
    in_flight.inc()
    try:
        outcomes = []
        for address in message.addresses:
            outcome = await _deliver_one(message, address, transport, door)
            if outcome is None:
                return None
            outcomes.append(outcome)
        return await door.settle(_delivery(message, outcomes))
    finally:
        in_flight.dec()
        door.give_permit_back()


def _written(d: Delivery) -> Delivery:
    """`d`, marked written (`dataclasses.replace` costs twice this, once per delivery)."""
    return Delivery(
        user_id=d.user_id,
        channel=d.channel,
        status=d.status,
        error=d.error,
        user_found=d.user_found,
        attempts=d.attempts,
        provider_id=d.provider_id,
        recorded=d.recorded,
        written=True,
        kind=d.kind,
        reconciled=d.reconciled,
    )


def _delivery(message: Message, outcomes: list[_Attempts]) -> Delivery:
    attempts = sum(o.count for o in outcomes)
    provider_id = " ".join(o.provider_id for o in outcomes if o.provider_id) or None
    reconciled = next((o.reconciled for o in outcomes if o.reconciled), None)
    failed = [(address, o) for address, o in zip(message.addresses, outcomes) if o.error is not None]
    if not failed:
        return Delivery(
            message.user_id, message.channel, "sent", attempts=attempts, provider_id=provider_id, reconciled=reconciled
        )
    if all(o.kind == "cancelled" for _, o in failed) and len(failed) == len(outcomes) and not attempts:
        return Delivery(message.user_id, message.channel, "cancelled", attempts=0)
    if len(message.addresses) == 1:
        error = failed[0][1].error
    else:
        detail = "; ".join(f"{_shorten(address)}: {o.error}" for address, o in failed)
        error = f"{len(failed)} of {len(message.addresses)} devices failed: {detail}"
    status: Status = "cancelled" if all(o.kind == "cancelled" for _, o in failed) and not provider_id else "failed"
    return Delivery(
        message.user_id,
        message.channel,
        status,
        error,
        attempts=attempts,
        provider_id=provider_id,
        kind=failed[0][1].kind,
        reconciled=reconciled,
    )


def _cancelled(result: _Attempts, journal: Unrecorded, last: DeliveryError | None) -> _Attempts | None:
    """A wait before a call ended by the run: cancelled by its client, or None (not attempted
    here) when a store failure stopped the run."""
    if not journal.cancelled:
        return None
    result.kind = "cancelled"
    result.error = "cancelled before its provider call"
    if isinstance(last, TransientDeliveryError) and last.ambiguous:
        # The attempt before may have reached the provider: that is what the client must know.
        result.kind = "ambiguous"
        result.error = f"{UNKNOWN_OUTCOME}: {last.reason}; cancelled before it was retried"
    elif last is not None:
        result.error = f"cancelled before attempt {result.count + 1}; the last failed: {last.reason}"
    return result


async def _deliver_one(message: Message, address: str, transport: Transport, door: _Door) -> _Attempts | None:
    policy = transport.policy
    name = transport.provider.name
    gate = transport.gate
    journal = door.journal
    result = _Attempts()
    channel = message.channel
    keys = (f"to:{address}", f"from:{getattr(message.content, 'sender', '')}")
    last: DeliveryError | None = None
    reconciler = transport.reconciler if policy.on_ambiguous == "reconcile" else None
    since = journal.reconcile_since(channel, message.user_id) if reconciler is not None else None
    if reconciler is not None and since is not None:
        # An earlier run stopped during this attempt: claim it, then ask before sending again.
        if journal.halted or not await door.claim():
            return _cancelled(result, journal, last)
        try:
            result.provider_id = await reconciler.find(message, address, since)
        except ReconcileError as exc:
            result.count, result.kind = 1, "ambiguous"
            reason = journal.unsettled_reason(channel, message.user_id)
            result.error = f"{reason}; {name} could not be asked whether it has it ({exc})"
            return result
        if result.provider_id is not None:
            result.count, result.reconciled = 1, "found"
            door.sent = True
            return result
        result.reconciled = "absent"
    while True:
        started = trio.current_time()
        claimed_at = time.time()
        try:
            if not gate.enter_nowait(keys):
                with journal.waiting() as wait:
                    await _enter(gate, keys, policy.max_retry_after)
                if wait.cancelled_caught:
                    return _cancelled(result, journal, last)
            try:
                if journal.halted or not await door.claim():
                    return _cancelled(result, journal, last)
                called = trio.current_time()
                metrics.observe_rate_limit_wait(channel, called - started)
                result.count += 1
                # A bare CancelScope rather than fail_after: this runs once per message.
                with trio.CancelScope(deadline=called + policy.timeout) as attempt_scope:
                    ref = current_delivery.set(
                        delivery_key(journal.job_id, channel, message.user_id) if journal.job_id else None
                    )
                    try:
                        result.provider_id = await transport.provider.send(message, address)
                    finally:
                        current_delivery.reset(ref)
            finally:
                gate.exit()
            if not attempt_scope.cancelled_caught:
                metrics.observe_attempt(channel, name, trio.current_time() - called, "ok")
                door.sent = True
                return result
            # The request may have reached the provider: as ambiguous as a crash mid-call.
            error: DeliveryError = TransientDeliveryError(
                f"{name}: no answer within {policy.timeout:g}s", ambiguous=True
            )
        except LimiterUnavailable as exc:
            return await _limiter_down(exc, result, door, policy.max_retry_after)
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
            door.give_permit_back()  # the lookup may wait for the listing to settle
            try:
                result.provider_id = await reconciler.find(message, address, claimed_at)
            except ReconcileError as exc:
                result.error = (
                    f"{UNKNOWN_OUTCOME}: {error.reason}{suffix}; {name} could not be asked whether it has it ({exc})"
                )
                return result
            if result.provider_id is not None:
                result.error, result.kind, result.reconciled = None, None, "found"
                door.sent = True
                return result
            result.reconciled = "absent"  # provably never sent: sending again duplicates nothing
            if result.count >= policy.max_attempts:
                result.error = f"{error.reason}{suffix}; {name} never received it"
                result.kind = "transient"
                return result
            await door.retrying(result.count, f"{error.reason}; {name} never received it")
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
            if error.pause_key is not None:
                # About one destination or sender (Twilio 14107, 21611): hold back only that one.
                gate.pause(error.pause_key, trio.current_time() + delay)
            else:
                # About the account: slow the whole channel, not just this message.
                gate.bucket.pause_until(trio.current_time() + delay)
        last = error
        if not error.ambiguous:
            await door.retrying(result.count, error.reason)
        else:
            door.give_permit_back()
        log.info("retrying %s for user %s in %.2fs: %s", channel, message.user_id, delay, error.reason)
        metrics.observe_retry(channel, name)
        with journal.waiting() as wait:
            await trio.sleep(delay)
        if wait.cancelled_caught:
            return _cancelled(result, journal, last)


async def _limiter_down(exc: LimiterUnavailable, result: _Attempts, door: _Door, waited: float) -> _Attempts | None:
    """The limiter did not answer for the whole wait (`max_retry_after_seconds`): this attempt was
    not made. The run stops starting deliveries and the job resumes it (a shared partition is
    taken again), so the delivery is sent then instead of failing for good: None."""
    message = door.message
    log.warning("%s for user %s: %s", message.channel, message.user_id, exc.reason)
    if door.sent:
        # Another device of the user took it: handing the delivery back would send that one again.
        result.error = f"{exc.reason}: not attempted, waited {waited:g}s for it"
        result.kind = "transient"
        return result
    await door.retrying(result.count, f"{exc.reason}: not attempted")  # an earlier attempt's claim, if any
    door.journal.stop(LimiterDown(f"{exc.reason}, for {waited:g}s"))
    return None


async def _enter(gate: ChannelGate, keys: tuple[str, ...], bound: float) -> None:
    """`gate.enter`, waiting out an unreachable limiter (Redis restarting) for up to `bound`
    seconds instead of failing at once: an outage shorter than that costs time, not deliveries.
    The cluster's own retries pace the attempts; this adds a capped backoff between them."""
    deadline = None
    backoff = 0.1
    while True:
        try:
            await gate.enter(keys)
            return
        except LimiterUnavailable:
            now = trio.current_time()
            deadline = now + bound if deadline is None else deadline
            if now >= deadline:
                raise
            await trio.sleep(min(backoff, deadline - now))
            backoff = min(2 * backoff, 2.0)


def _kind(error: DeliveryError) -> str:
    if not isinstance(error, TransientDeliveryError):
        return "permanent"
    return "throttled" if error.throttled else "ambiguous" if error.ambiguous else "transient"


def _shorten(token: str) -> str:
    return token if len(token) <= 12 else f"{token[:6]}…{token[-4:]}"
