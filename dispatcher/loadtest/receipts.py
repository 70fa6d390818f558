"""What the fakes received, per channel, as (arrival time, address) pairs.

The fakes run in a process of their own (`fake_providers.py`). There, a `ReceiptCollector` walks
the fakes' `received` lists from where it stopped and hands over what is new, stamped in
`time.perf_counter()` seconds (CLOCK_MONOTONIC on Linux: one clock for every process of the
machine). Here, a `ReceiptTap` keeps the per-channel columns the analysis slices, on the harness's
Trio clock, and the Twilio status callbacks the fake posted (`--receipts`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ..fakes.fcm import FakeFcm
    from ..fakes.smtp import SmtpSink
    from ..fakes.twilio import FakeTwilio

CHANNELS = ("email", "sms", "voice", "push")


class StampedList(list[Any]):
    """A list that remembers when each item was appended (`time.perf_counter()`).

    `SmtpSink.received` entries carry no arrival time; the sink appends them from its own
    thread, so the stamp is taken there, at the moment the sink accepts the message.
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.perf_counter())  # before the item: a reader never sees an unstamped item
        super().append(item)


class ReceiptCollector:
    """In the fakes' process: what the fakes received since the last `drain()`, as a JSON-ready
    batch (`ReceiptTap.add` takes it). Create it inside Trio: the HTTP fakes stamp arrivals with
    `trio.current_time()`, which it converts to `perf_counter` seconds."""

    def __init__(self, sink: SmtpSink | None, twilio: FakeTwilio | None, fcm: FakeFcm | None) -> None:
        self._sink, self._twilio, self._fcm = sink, twilio, fcm
        if sink is not None and not isinstance(sink.received, StampedList):
            raise TypeError("give the sink a StampedList as `received` before it starts")
        # Trio's clock is perf_counter plus an offset; measure the offset once.
        self._offset = trio.current_time() - time.perf_counter()
        self._cursors = {"smtp": 0, "twilio": 0, "fcm": 0, "callbacks": 0}

    def drain(self) -> dict[str, Any]:
        received: dict[str, list[tuple[float, str]]] = {}
        if self._sink is not None:
            mail = self._sink.received
            assert isinstance(mail, StampedList)
            end = len(mail)
            email = received.setdefault("email", [])
            for i in range(self._cursors["smtp"], end):
                email.extend((mail.times[i], address) for address in mail[i].rcpt_tos)
            self._cursors["smtp"] = end
        offset = self._offset
        batch: dict[str, Any] = {"received": received}
        if self._twilio is not None:
            twilio = self._twilio
            end = len(twilio.received)
            for i in range(self._cursors["twilio"], end):
                request = twilio.received[i]
                channel = "voice" if request.kind == "call" else "sms"
                received.setdefault(channel, []).append((request.time - offset, request.form.get("To", "")))
            self._cursors["twilio"] = end
            start, end = self._cursors["callbacks"], len(twilio.callback_times)
            batch["callbacks"] = [
                (form.get("MessageStatus") or form.get("CallStatus"), answer, when - offset)
                for (form, answer), when in zip(twilio.callbacks[start:end], twilio.callback_times[start:end])
            ]
            self._cursors["callbacks"] = end
            # Two callbacks per message (`sent`, then the final status), one per call.
            batch["callbacks_due"] = sum(2 if entry["resource"] == "Messages" else 1 for entry in twilio.created)
        if self._fcm is not None:
            fcm = self._fcm
            end = len(fcm.received)
            received["push"] = [
                (fcm.received[i].time - offset, fcm.received[i].token or "") for i in range(self._cursors["fcm"], end)
            ]
            self._cursors["fcm"] = end
        return batch


@dataclass
class ChannelReceipts:
    times: list[float] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Slice:
    """The receipts of one channel during one phase."""

    times: list[float]
    addresses: list[str]

    def counts(self) -> Counter[str]:
        return Counter(self.addresses)


@dataclass(frozen=True, slots=True)
class Callback:
    """A status callback the fake Twilio posted: the status it carried, the service's HTTP answer
    (None when the post failed), when that came (Trio clock)."""

    status: str | None
    answer: int | None
    time: float


class ReceiptTap:
    """Per-channel receipts of the fakes, on this process's Trio clock (create it inside Trio).
    `fetch` asks the fakes' process for the batch of what is new: `refresh()` (or `mark()`)
    before reading what arrived up to now."""

    def __init__(self, fetch: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._fetch = fetch
        self._lock = trio.Lock()  # one question to the fakes' process at a time
        self._offset = trio.current_time() - time.perf_counter()
        self.channels: dict[str, ChannelReceipts] = {c: ChannelReceipts() for c in CHANNELS}
        self.callbacks: list[Callback] = []
        self.callbacks_due = 0

    def add(self, batch: dict[str, Any]) -> None:
        offset = self._offset
        for channel, entries in batch["received"].items():
            receipts = self.channels[channel]
            for when, address in entries:
                receipts.times.append(when + offset)
                receipts.addresses.append(address)
        self.callbacks.extend(
            Callback(status, answer, when + offset) for status, answer, when in batch.get("callbacks", ())
        )
        self.callbacks_due = batch.get("callbacks_due", self.callbacks_due)

    async def refresh(self) -> None:
        async with self._lock:
            self.add(await self._fetch())

    async def mark(self) -> dict[str, int]:
        """Counts up to now, to slice a phase's receipts out later."""
        await self.refresh()
        return {channel: len(r.times) for channel, r in self.channels.items()}

    def count(self, channel: str) -> int:
        return len(self.channels[channel].times)

    def since(self, mark: dict[str, int], channel: str) -> Slice:
        receipts = self.channels[channel]
        start = mark.get(channel, 0)
        return Slice(receipts.times[start:], receipts.addresses[start:])
