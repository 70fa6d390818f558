"""What travels between the actors (users, rendered messages, delivery outcomes) and what one
send produces (its summary and failures).

Plain dataclasses: validation happened at the edge, the pipeline only moves these along. A
message's content is opaque here: the channel that built it and the provider that sends it agree
on its type (`dispatcher.messages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

User = dict[str, Any]  # a user document with its `_id` as a string


@dataclass(frozen=True, slots=True)
class Message:
    """One rendered message for one user on one channel.

    `addresses` holds one e-mail address or phone number, or every device token of the user:
    the push sender delivers to each and reports the user once.
    """

    channel: str
    user_id: str
    addresses: tuple[str, ...]
    content: object


Status = Literal["sent", "skipped", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one (user, channel) delivery."""

    user_id: str
    channel: str
    status: Status
    error: str | None = None
    # False for a requested id that matched no user: reported, but not a user reached.
    user_found: bool = True
    attempts: int = 0
    # The provider's id of what it accepted (several, space-separated, for several devices).
    provider_id: str | None = None
    # Read back from the ledger (a resumed job): already recorded, not to be written again.
    recorded: bool = False
    # Its outcome was written by its sender right after the provider call (not to be written again).
    written: bool = False
    # Why a failure failed, for the metrics: transient, permanent, throttled, ambiguous, render,
    # not_found, internal.
    kind: str | None = None
    # An ambiguous attempt resolved by asking the provider: "found" (it had it) or "absent".
    reconciled: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    user_id: str
    channel: str
    error: str


@dataclass(slots=True)
class Summary:
    users: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    # Deliveries a `DELETE /send/{id}` stopped; shown only when there are some, so that a
    # synchronous send answers exactly the predecessor's shape.
    cancelled: dict[str, int] = field(default_factory=dict)

    def count(self, delivery: Delivery, *, counting_users: bool) -> None:
        """Count one delivery; `counting_users`: it is of the channel users are counted on
        (every lane sees every selected user once, so one lane's count is the users')."""
        counts = getattr(self, delivery.status)
        counts[delivery.channel] = counts.get(delivery.channel, 0) + 1
        if counting_users and delivery.user_found:
            self.users += 1

    def to_json(self) -> dict[str, Any]:
        body = {"users": self.users, "sent": self.sent, "skipped": self.skipped, "failed": self.failed}
        if self.cancelled:
            body["cancelled"] = self.cancelled
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Summary:
        return cls(
            body.get("users", 0),
            dict(body.get("sent", {})),
            dict(body.get("skipped", {})),
            dict(body.get("failed", {})),
            dict(body.get("cancelled", {})),
        )


@dataclass(slots=True)
class SendResult:
    failures: list[Failure] = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)
    # The job's id (`GET /send/{id}`); None without the ledger, where there is no job to name.
    job_id: str | None = None
