"""How a fake provider answers: scripted outcomes first, then random ones from the rates."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import trio

Outcome = Literal["ok", "permanent", "transient", "throttle", "stall"]


@dataclass
class Faults:
    """`latency` is a fixed delay in seconds or a (low, high) uniform range. Rates are
    probabilities per request. `script` outcomes are used, in order, before any random one."""

    latency: float | tuple[float, float] = 0.0
    permanent_rate: float = 0.0
    transient_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after: float = 1.0
    script: deque[Outcome] = field(default_factory=deque)
    seed: int | None = None

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def next_outcome(self) -> Outcome:
        if self.script:
            return self.script.popleft()
        draw = self._random.random()
        for outcome, rate in (
            ("permanent", self.permanent_rate),
            ("transient", self.transient_rate),
            ("throttle", self.throttle_rate),
        ):
            if draw < rate:
                return outcome  # type: ignore[return-value]
            draw -= rate
        return "ok"

    async def wait(self, outcome: Outcome) -> None:
        """Sleep for the latency (forever for a stall, until the client gives up)."""
        if outcome == "stall":
            await trio.sleep_forever()
        delay = self._random.uniform(*self.latency) if isinstance(self.latency, tuple) else self.latency
        if delay > 0:
            await trio.sleep(delay)
