"""The states of one delivery, and the order in which receipts may move it.

    sending ─▶ sent ─▶ unconfirmed ─▶ delivered | undelivered
       └─▶ failed | skipped | cancelled

`sending`: claimed, its provider call may be under way. `sent`: the provider accepted it (an id
came back); nothing more is known. `delivered` / `undelivered`: a provider receipt said it
reached, or did not reach, the handset or phone (`undelivered` carries the provider's code and
text and whether the failure is permanent or temporary). `unconfirmed`: still `sent` when
`[ledger].receipt_timeout_hours` ran out on a channel whose provider sends receipts; a late
receipt still moves it on. `failed`, `skipped`, `cancelled`: decided by the service itself,
never by a receipt.

Receipts only move a delivery forward along `RANK`: a receipt whose state does not rank above the
delivery's changes nothing (a late `sent` after `delivered`, a duplicate, a second final
receipt). The ledger enforces it in the write's filter, so concurrent receipts are safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ReceiptState = Literal["sent", "delivered", "undelivered"]

# States a receipt may move a delivery out of, by how far along they are.
RANK = {"sending": 0, "sent": 1, "unconfirmed": 2, "delivered": 3, "undelivered": 3}

# Accepted by the provider: what the run's summary counts as `sent`.
ACCEPTED_STATES = frozenset({"sent", "unconfirmed", "delivered", "undelivered"})
# Settled: never attempted again by a resumed run.
SETTLED_STATES = ACCEPTED_STATES | {"failed", "skipped", "cancelled"}
# Counted per channel by `GET /send/{id}`, beside the run's own counts.
RECEIPT_STATES = ("delivered", "undelivered", "unconfirmed")


def below(state: str) -> list[str]:
    """The states a receipt saying `state` may replace."""
    rank = RANK[state]
    return [s for s, r in RANK.items() if r < rank]


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a provider said about a message after accepting it.

    `sid`: the provider's id (the delivery's `provider_id`). `status`: the provider's own word
    (Twilio's MessageStatus or CallStatus). `permanent`: for `undelivered`, whether trying again
    is pointless. `at`: epoch seconds when the service received it. `delivery`: the ledger's id of
    the delivery, when the receipt names it (Twilio's callback URL carries it since this field
    exists; receipts of messages created before name only the SID).
    """

    sid: str
    state: ReceiptState
    status: str
    at: float
    code: str | None = None
    reason: str | None = None
    permanent: bool = False
    delivery: str | None = None

    def error(self) -> str | None:
        """The failure text shown for an `undelivered` delivery."""
        if self.state != "undelivered":
            return None
        kind = "permanent" if self.permanent else "temporary"
        return f"undelivered ({kind}): {self.reason or self.status}"

    def entry(self) -> dict[str, object]:
        """The receipt as the delivery's history keeps it."""
        entry: dict[str, object] = {"status": self.status, "state": self.state, "at": self.at}
        if self.code:
            entry["code"] = self.code
        return entry


__all__ = ["ACCEPTED_STATES", "RANK", "RECEIPT_STATES", "SETTLED_STATES", "Receipt", "below"]
