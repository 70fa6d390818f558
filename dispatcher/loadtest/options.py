"""What one `dispatcher loadtest` run does: the scenario, the fakes' behaviour and the service's
configuration, parsed once from the command line (or built directly by tests)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

CHANNELS: tuple[str, ...] = ("email", "sms", "push", "voice")
ERROR_KINDS: tuple[str, ...] = ("permanent", "transient", "throttle")

Scenario = Literal["fanout", "stream"]
Mode = Literal["process", "embedded"]
Latency = float | tuple[float, float]


class OptionError(ValueError):
    """An option value that cannot be used; the message names the option."""


@dataclass(frozen=True, slots=True)
class ErrorMix:
    """Probabilities, per request reaching a fake, of each injected error: `permanent` (Twilio
    21610, FCM INVALID_ARGUMENT, SMTP 554), `transient` (503 / SMTP 451) and `throttle` (429 with
    `Retry-After` / SMTP 421)."""

    permanent: float = 0.0
    transient: float = 0.0
    throttle: float = 0.0

    @property
    def total(self) -> float:
        return self.permanent + self.transient + self.throttle


@dataclass(frozen=True)
class LoadTestOptions:
    """Every knob of a run. Channel-keyed mappings only name the channels they change; the rest
    keep the service's defaults (or those of `base_config`)."""

    scenario: Scenario = "fanout"
    mode: Mode = "process"
    users: int = 1000
    channels: tuple[str, ...] = ("email", "sms", "push")
    # Fakes: answer after `latency` seconds (fixed, or uniform in a (low, high) range).
    latency: Latency = 0.0
    errors: Mapping[str, ErrorMix] = field(default_factory=dict)
    retry_after: float = 1.0
    # Service configuration.
    concurrency: Mapping[str, int] = field(default_factory=dict)
    rate: Mapping[str, float] = field(default_factory=dict)
    burst: Mapping[str, int] = field(default_factory=dict)
    timeout: float | None = None
    max_attempts: int | None = None
    backoff: float | None = None
    smtp_pool_size: int | None = None
    queue_size: int | None = None
    store_batch_size: int | None = None
    ledger: bool | None = None  # [store].ledger; None: the service's default (on)
    base_config: Path | None = None
    # Processes: `replicas` services on their own ports behind the harness's round-robin client,
    # `workers` per service (`dispatcher serve --workers`); with more than one process in all, or
    # with `redis`, the harness starts a Redis and the services run in cluster mode.
    replicas: int = 1
    workers: int | None = None
    redis: bool = False
    # Stream scenario.
    rps: float = 200.0
    duration: float = 30.0
    clients: int = 64
    # Baselines.
    compare: bool = False
    naive_sample: int = 500
    apprise_sample: int = 500
    # Rounds of the measured phases, interleaved (pipeline, baselines, pipeline, ...); medians reported.
    repeat: int = 1
    # Durability: SIGKILL the service once this fraction of the expected deliveries reached the
    # fakes, start it again, and check that the resumed job lost nothing and sent nothing twice.
    kill_at: float | None = None
    # Twilio status callbacks from the fake to the service (its delay in seconds), or None: off.
    receipts_delay: float | None = None
    kill_lease_seconds: float = 2.0
    # Harness.
    output: Path = Path("loadtest-results")
    progress: bool = True
    seed: int = 1
    request_timeout: float = 3600.0
    service_log_level: str = "WARNING"

    def __post_init__(self) -> None:
        if self.users < 1:
            raise OptionError("--users: at least 1")
        if not self.channels:
            raise OptionError("--channels: at least one channel")
        for channel in self.channels:
            if channel not in CHANNELS:
                raise OptionError(f"--channels: {channel!r} is not one of {', '.join(CHANNELS)}")
        if len(set(self.channels)) != len(self.channels):
            raise OptionError("--channels: a channel is listed twice")
        for name, mapping in (
            ("--concurrency", self.concurrency),
            ("--rate", self.rate),
            ("--burst", self.burst),
            ("--errors", self.errors),
        ):
            for channel in mapping:
                if channel not in CHANNELS:
                    raise OptionError(f"{name}: {channel!r} is not a channel")
        for channel, mix in self.errors.items():
            if mix.total > 1:
                raise OptionError(f"--errors: the rates of {channel} add up to more than 1")
        if self.compare and self.scenario != "fanout":
            raise OptionError("--compare: the baselines exist for the fanout scenario only")
        if self.repeat < 1:
            raise OptionError("--repeat: at least 1")
        if self.replicas < 1 or (self.workers is not None and self.workers < 1):
            raise OptionError("--replicas and --workers: at least 1")
        if self.mode == "embedded" and (self.replicas > 1 or self.workers is not None or self.kill_at is not None):
            raise OptionError("--replicas, --workers and --kill-at need --mode process")
        if self.kill_at is not None:
            if not 0 <= self.kill_at < 1:
                raise OptionError("--kill-at: a fraction of the expected deliveries, 0 <= F < 1")
            if self.scenario != "fanout" or self.compare or self.repeat > 1 or self.processes > 1:
                raise OptionError("--kill-at: one fan-out on one service (no --compare, --repeat, --replicas)")
            if self.ledger is False:
                raise OptionError("--kill-at: the resumed job is the ledger's; it cannot be off")
            if self.kill_lease_seconds <= 0:
                raise OptionError("--kill-lease: must be positive")
        if self.scenario == "stream" and (self.rps <= 0 or self.duration <= 0 or self.clients < 1):
            raise OptionError("--rps, --duration and --clients must be positive")

    def errors_for(self, channel: str) -> ErrorMix:
        return self.errors.get(channel, ErrorMix())

    @property
    def processes(self) -> int:
        """Service processes in all (replicas times workers)."""
        return self.replicas * (self.workers or 1)

    @property
    def cluster(self) -> bool:
        """Whether the services share a Redis (cluster-wide rate limits)."""
        return self.redis or self.processes > 1


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "": 1.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*")


def parse_duration(text: str, *, unit_required: bool = False) -> float:
    """'20ms', '1.5s', '2m', or a bare number of seconds."""
    match = _DURATION.fullmatch(text)
    if match is None or (unit_required and not match[2]):
        raise OptionError(f"{text!r} is not a duration (e.g. 20ms, 1.5s, 2m)")
    return float(match[1]) * _UNITS[match[2] or ""]


def parse_latency(text: str) -> Latency:
    """'20ms' (fixed) or '10ms-30ms' / '10-30ms' (uniform in the range); a unit is required."""
    low_text, sep, high_text = text.partition("-")
    if not sep:
        return parse_duration(text, unit_required=True)
    high_match = _DURATION.fullmatch(high_text)
    if high_match is None or not high_match[2]:
        raise OptionError(f"{text!r} is not a latency range (e.g. 10ms-30ms)")
    low_match = _DURATION.fullmatch(low_text)
    if low_match is not None and not low_match[2]:
        low_text += high_match[2]  # '10-30ms': the unit of the upper bound applies to both
    low, high = parse_duration(low_text, unit_required=True), parse_duration(high_text, unit_required=True)
    if low > high:
        raise OptionError(f"{text!r}: the lower bound exceeds the upper one")
    return (low, high)


def parse_channel_values(
    text: str,
    convert: type[int] | type[float],
    channels: tuple[str, ...] = CHANNELS,
) -> dict[str, int | float]:
    """'sms=100,email=20' or a bare value for every channel."""
    values: dict[str, int | float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        targets = [name.strip()] if sep else list(channels)
        raw = value if sep else name
        try:
            number = convert(raw.strip())
        except ValueError:
            raise OptionError(f"{part!r}: {raw.strip()!r} is not a number") from None
        if number < 0:
            raise OptionError(f"{part!r}: must not be negative")
        for channel in targets:
            values[channel] = number
    return values


def parse_errors(text: str, channels: tuple[str, ...] = CHANNELS) -> dict[str, ErrorMix]:
    """'permanent=0.01,transient=0.02,throttle=0.001' for every channel; 'sms.permanent=0.05'
    for one. Percentages ('2%') are accepted."""
    rates: dict[str, dict[str, float]] = {}
    # Later entries win, so 'permanent=0.01,sms.permanent=0.1' singles out SMS.
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise OptionError(f"--errors: {part!r} is not KIND=RATE")
        channel, dot, kind = key.strip().rpartition(".")
        if kind not in ERROR_KINDS:
            raise OptionError(f"--errors: {kind!r} is not one of {', '.join(ERROR_KINDS)}")
        value = value.strip()
        try:
            rate = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            raise OptionError(f"--errors: {value!r} is not a rate") from None
        if not 0 <= rate <= 1:
            raise OptionError(f"--errors: {part!r} must be between 0 and 1")
        for target in [channel] if dot else list(channels):
            rates.setdefault(target, {})[kind] = rate
    return {channel: ErrorMix(**kinds) for channel, kinds in rates.items()}
