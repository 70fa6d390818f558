"""What the fakes received, per channel, as (arrival time, address) pairs on the Trio clock.

The fakes append to their `received` lists from their own tasks (and, for SMTP, from the sink's
thread); a `ReceiptTap` copies the new entries into per-channel columns when polled, so counting
and slicing never walk the fakes' lists twice.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from ..fakes.fcm import FakeFcm
from ..fakes.smtp import SmtpSink
from ..fakes.twilio import FakeTwilio


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


@dataclass
class ChannelReceipts:
    times: list[float] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    def add(self, when: float, address: str) -> None:
        self.times.append(when)
        self.addresses.append(address)


@dataclass(frozen=True, slots=True)
class Slice:
    """The receipts of one channel during one phase."""

    times: list[float]
    addresses: list[str]

    def counts(self) -> Counter[str]:
        return Counter(self.addresses)


class ReceiptTap:
    """Per-channel receipts of the fakes. Create it inside Trio (it converts the sink's
    `perf_counter` stamps to `trio.current_time()`), then `poll()` whenever fresh counts matter."""

    def __init__(self, sink: SmtpSink | None, twilio: FakeTwilio | None, fcm: FakeFcm | None) -> None:
        self._sink, self._twilio, self._fcm = sink, twilio, fcm
        if sink is not None and not isinstance(sink.received, StampedList):
            raise TypeError("give the sink a StampedList as `received` before it starts")
        # Trio's clock is perf_counter plus an offset; measure the offset once.
        self._offset = trio.current_time() - time.perf_counter()
        self._cursors = {"smtp": 0, "twilio": 0, "fcm": 0}
        self.channels: dict[str, ChannelReceipts] = {c: ChannelReceipts() for c in ("email", "sms", "voice", "push")}

    def poll(self) -> None:
        if self._sink is not None:
            received = self._sink.received
            assert isinstance(received, StampedList)
            end = len(received)
            email = self.channels["email"]
            for i in range(self._cursors["smtp"], end):
                when = received.times[i] + self._offset
                for address in received[i].rcpt_tos:
                    email.add(when, address)
            self._cursors["smtp"] = end
        if self._twilio is not None:
            received_t = self._twilio.received
            end = len(received_t)
            for i in range(self._cursors["twilio"], end):
                request = received_t[i]
                channel = "voice" if request.kind == "call" else "sms"
                self.channels[channel].add(request.time, request.form.get("To", ""))
            self._cursors["twilio"] = end
        if self._fcm is not None:
            received_f = self._fcm.received
            end = len(received_f)
            push = self.channels["push"]
            for i in range(self._cursors["fcm"], end):
                push.add(received_f[i].time, received_f[i].token or "")
            self._cursors["fcm"] = end

    def count(self, channel: str) -> int:
        return len(self.channels[channel].times)

    def mark(self) -> dict[str, int]:
        """Current counts, to slice a phase's receipts out later."""
        self.poll()
        return {channel: len(r.times) for channel, r in self.channels.items()}

    def since(self, mark: dict[str, int], channel: str) -> Slice:
        self.poll()
        receipts = self.channels[channel]
        start = mark.get(channel, 0)
        return Slice(receipts.times[start:], receipts.addresses[start:])
