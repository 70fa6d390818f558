"""The service's exceptions.

`DispatcherError` is the root. None of them knows HTTP: `web.STATUS` maps each class to the
status the app answers with, in one place. Provider failures are `DeliveryError`s, classified once by
the provider into transient (worth retrying) or permanent.
"""

from __future__ import annotations

from actors.messages import SendResult
from actors.faults import LimiterFault, RenderFault, RunFault, StoreFault


class DispatcherError(Exception):
    """Base class of every error raised on purpose by this service."""


class ConfigError(DispatcherError):
    """The configuration is invalid; the message names the key."""


class StoreInUse(DispatcherError):
    """Another process holds the embedded store's data directory."""


class RequestError(DispatcherError):
    """The request cannot be accepted; nothing was sent."""


class PayloadTooLarge(RequestError):
    """The body is larger than `[server].max_body_bytes`."""


class UpstreamError(RequestError):
    """A service we depend on before sending (the Files Service) is down."""


class ShuttingDown(RequestError):
    """The service is draining: it takes no new sends."""


class NotFound(RequestError):
    """No such job (or not one the caller may see)."""


class Conflict(RequestError):
    """An idempotency key already used with a different request."""


class Interrupted(DispatcherError):
    """A store outage or a shutdown stopped an accepted send before every delivery was
    attempted. `partial` holds what was attempted; `job_id` names the job that will be resumed
    (None without the ledger)."""

    def __init__(self, message: str, partial: SendResult, job_id: str | None = None) -> None:
        super().__init__(message)
        self.partial = partial
        self.job_id = job_id


class StillRunning(DispatcherError):
    """A synchronous send still running when `[server].sync_timeout_seconds` ran out: the job goes
    on; the client follows it by its id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} is still running")
        self.job_id = job_id


class InternalError(DispatcherError):
    """A bug stopped a send; it is logged with its traceback."""


class LeaseLost(DispatcherError, RunFault):
    """Another instance took over the job's (or a shared partition's) lease: this one was too slow
    to renew it. This run stops, the other delivers the rest. Not a store outage: the store answered."""


class StoreError(DispatcherError, StoreFault):
    """The user/template store cannot be reached."""


class LimiterDown(DispatcherError, LimiterFault):
    """A delivery waited its channel's whole `max_retry_after_seconds` for the cluster's rate
    limiter (Redis) without an answer: the run stops starting deliveries, nothing of what waited
    was attempted, and the job resumes the run (a shared partition is taken again)."""


class RenderError(DispatcherError, RenderFault):
    """A template failed for one user (output too large, a helper given a bad value): that
    delivery fails, the others go on."""


class DeliveryError(DispatcherError):
    """One attempt to hand one message to a provider failed.

    `reason` is the short, human-readable text reported to the client (it names the provider and
    its error code when there is one).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentDeliveryError(DeliveryError):
    """Retrying will not help (invalid address, unregistered token, rejected recipient)."""


class TransientDeliveryError(DeliveryError):
    """Worth retrying: timeouts, dropped connections, 429, 5xx.

    `retry_after` is the provider's own hint in seconds; `throttled` marks a 429, which slows the
    whole channel (the account's limit) rather than only this message, unless `pause_key` names
    what the limit concerns (`"to:<number>"`, `"from:<number>"`: one destination or one sender),
    which is then paused alone; `ambiguous` says the message may have reached the provider anyway
    (a timeout or a connection lost after the request was sent), so a retry may duplicate it: the
    channel's `on_ambiguous` decides.
    """

    def __init__(
        self,
        reason: str,
        *,
        retry_after: float | None = None,
        throttled: bool = False,
        ambiguous: bool = False,
        pause_key: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.throttled = throttled
        self.ambiguous = ambiguous
        self.pause_key = pause_key


class LimiterUnavailable(TransientDeliveryError):
    """The limiter a delivery waits on cannot be reached (cluster mode: Redis): nothing was sent,
    no attempt is spent; the delivery waits for it, within a bound."""
