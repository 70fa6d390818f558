"""Prometheus metrics (`GET /-/metrics`), with the official `prometheus-client`.

Every label has a bounded set of values: channels, providers, outcomes, failure kinds, stages,
job states, HTTP methods, route *templates* (`/send/{id}`, never the id) and status codes. No
user id, address or request id ever becomes a label; an unexpected value is recorded as
`other`.

The delivery code calls the small functions below (`observe_attempt`, `observe_delivery`, ...);
the HTTP layer is instrumented by `dispatcher.ops`.

Several worker processes: set `PROMETHEUS_MULTIPROC_DIR` to an empty, writable directory in the
environment of the parent *before* any process imports `prometheus_client` (the library picks its
storage at import time). Each process then writes its samples to files there, and a scrape of any
worker aggregates every process's files (`MultiProcessCollector`): counters and histograms are
summed, the in-flight and queue gauges are summed over live processes (`livesum`). Empty the
directory when the service starts (`clear_multiprocess_dir`) and call `mark_process_dead(pid)`
when a worker exits.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

from .channels import CHANNELS

# A `_created` series beside every counter and histogram doubles the series for a timestamp that
# Prometheus does not use (process start is in `process_start_time_seconds`).
disable_created_metrics()

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # The metrics below without labels open their sample file as soon as they are created.
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

OTHER = "other"

DELIVERY_OUTCOMES = ("sent", "failed", "skipped")
# Why a delivery failed: transient errors that outlasted the retries, permanent provider errors,
# throttling that asked for a longer pause than allowed, a template that failed for the user, a
# requested id without a user, an attempt whose outcome is unknown (no answer, or its run did not settle it),
# a cancelled send, a bug in a provider.
FAILURE_KINDS = ("transient", "permanent", "throttled", "render", "not_found", "ambiguous", "cancelled", "internal")
# What one provider call ended with.
ATTEMPT_OUTCOMES = ("ok", "transient", "permanent", "throttled", "timeout", "internal")
# The bounded channels between actors, named after the stage that reads them.
QUEUE_STAGES = ("render", "send", "collect", "partition")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# A synchronous POST /send answers once every delivery was attempted: minutes for a large one.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

DELIVERIES = Counter(
    "dispatcher_deliveries", "Deliveries (user, channel) finished, by outcome", ["channel", "provider", "outcome"]
)
DELIVERY_FAILURES = Counter(
    "dispatcher_delivery_failures", "Failed deliveries by kind of failure", ["channel", "provider", "kind"]
)
PROVIDER_CALLS = Counter(
    "dispatcher_provider_calls", "Provider calls (attempts) by outcome", ["channel", "provider", "outcome"]
)
PROVIDER_LATENCY = Histogram(
    "dispatcher_provider_call_seconds",
    "Duration of one provider call",
    ["channel", "provider"],
    buckets=_LATENCY_BUCKETS,
)
RETRIES = Counter("dispatcher_retries", "Attempts repeated after a transient error", ["channel", "provider"])
RATE_LIMIT_WAIT = Histogram(
    "dispatcher_rate_limit_wait_seconds",
    "Time a delivery waited for its channel's rate limit (token bucket or Retry-After pause)",
    ["channel"],
    buckets=_WAIT_BUCKETS,
)
SENDS_IN_FLIGHT = Gauge(
    "dispatcher_sends_in_flight", "Sends (requests or jobs) accepted and not finished", multiprocess_mode="livesum"
)
DELIVERIES_IN_FLIGHT = Gauge(
    "dispatcher_deliveries_in_flight",
    "Deliveries being attempted (retries included)",
    ["channel"],
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "dispatcher_queue_depth",
    "Items buffered in the channels between actors, by reading stage",
    ["stage"],
    multiprocess_mode="livesum",
)
JOBS = Counter("dispatcher_jobs", "Jobs that entered each state", ["state"])
# Divided by dispatcher_deliveries_total: the Redis cost of the shared rate limits per delivery.
REDIS_LIMIT_ROUND_TRIPS = Counter(
    "dispatcher_redis_limit_round_trips", "Redis round trips answered for the cluster-wide rate limits"
)


def _version() -> str:
    # Not `dispatcher.__version__`: the package imports this module while it initialises.
    try:
        return importlib.metadata.version("trio-dispatcher")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


BUILD_INFO = Gauge(
    "dispatcher_build_info",
    "Always 1; the labels say which service runs (version, Python)",
    ["version", "python"],
    multiprocess_mode="max",
)
BUILD_INFO.labels(_version(), platform.python_version()).set(1)
HTTP_REQUESTS = Counter(
    "dispatcher_http_requests", "HTTP requests answered, by route template and status", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "dispatcher_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=_HTTP_BUCKETS,
)


def _bounded(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


def _providers() -> frozenset[str]:
    # Imported late: the provider modules will import this one to report their calls.
    from .providers import PROVIDERS

    return frozenset(PROVIDERS)


def _labels(channel: str, provider: str) -> tuple[str, str]:
    return _bounded(channel, CHANNELS), _bounded(provider, _providers())


# --- the delivery path (called by the pipeline)


# The delivery path reports several series per delivery; `labels()` (label checks, a lock, a
# dict) on each cost more than the samples themselves, so each series is looked up once per
# distinct arguments. Bounded: arguments that are not known values (bounded to `other`) must not
# grow it for ever.
_series: dict[tuple[object, ...], Any] = {}
_SERIES_BOUND = 4096


def _series_of(key: tuple[object, ...], make: Any) -> Any:
    child = _series.get(key)
    if child is None:
        if len(_series) >= _SERIES_BOUND:
            _series.clear()
        child = _series[key] = make()
    return child


def observe_attempt(channel: str, provider: str, seconds: float, outcome: str) -> None:
    """One provider call took `seconds` and ended with `outcome` (one of `ATTEMPT_OUTCOMES`)."""
    latency, calls = _series_of(
        ("attempt", channel, provider, outcome), lambda: _attempt_series(channel, provider, outcome)
    )
    latency.observe(max(seconds, 0.0))
    calls.inc()


def _attempt_series(channel: str, provider: str, outcome: str) -> tuple[Any, Any]:
    ch, prov = _labels(channel, provider)
    return PROVIDER_LATENCY.labels(ch, prov), PROVIDER_CALLS.labels(ch, prov, _bounded(outcome, ATTEMPT_OUTCOMES))


def observe_retry(channel: str, provider: str) -> None:
    """A delivery is about to be attempted again after a transient error."""
    RETRIES.labels(*_labels(channel, provider)).inc()


def observe_rate_limit_wait(channel: str, seconds: float) -> None:
    """A delivery waited `seconds` for a rate-limit token or a channel-wide `Retry-After` pause."""
    _series_of(("wait", channel), lambda: RATE_LIMIT_WAIT.labels(_bounded(channel, CHANNELS))).observe(
        max(seconds, 0.0)
    )


def observe_delivery(channel: str, provider: str, outcome: str, kind: str | None = None) -> None:
    """A (user, channel) delivery finished: `outcome` is `sent`, `failed` or `skipped`; a failure
    also gives its `kind` (one of `FAILURE_KINDS`)."""
    for series in _series_of(
        ("delivery", channel, provider, outcome, kind), lambda: _delivery_series(channel, provider, outcome, kind)
    ):
        series.inc()


def _delivery_series(channel: str, provider: str, outcome: str, kind: str | None) -> tuple[Any, ...]:
    ch, prov = _labels(channel, provider)
    outcome = _bounded(outcome, DELIVERY_OUTCOMES)
    if outcome != "failed":
        return (DELIVERIES.labels(ch, prov, outcome),)
    return DELIVERIES.labels(ch, prov, outcome), DELIVERY_FAILURES.labels(
        ch, prov, _bounded(kind or OTHER, FAILURE_KINDS)
    )


@contextmanager
def track_send() -> Iterator[None]:
    """Count a send (a synchronous request or a job) as in flight for the duration of the block."""
    SENDS_IN_FLIGHT.inc()
    try:
        yield
    finally:
        SENDS_IN_FLIGHT.dec()


def deliveries_in_flight(channel: str) -> Any:
    """The gauge of `channel`'s deliveries being attempted (from the first attempt to the
    outcome): `inc()` then `dec()` in a `finally`, on the per-delivery path."""
    return _series_of(("in flight", channel), lambda: DELIVERIES_IN_FLIGHT.labels(_bounded(channel, CHANNELS)))


CALLBACKS = Counter(
    "dispatcher_callbacks",
    "Tries of callbacks to clients, by event, outcome (delivered, retry, dead) and try number (6+ for later ones)",
    ["event", "outcome", "attempt"],
)
CALLBACK_OUTBOX_DEPTH = Gauge(
    "dispatcher_callback_outbox_depth",
    "Callbacks in the outbox not delivered yet (stamped deliveries not read into one yet are not counted)",
    multiprocess_mode="max",
)
CALLBACK_DEAD_LETTERS = Gauge(
    "dispatcher_callback_dead_letters",
    "Callbacks given up (GET /callbacks?state=dead lists them)",
    multiprocess_mode="max",
)
CALLBACK_EVENTS = ("job.finished", "delivery.updated")
CALLBACK_OUTCOMES = ("delivered", "retry", "dead")


def observe_callback(event: str, outcome: str, attempt: int) -> None:
    """One try of one callback ended with `outcome`."""
    label = str(attempt) if attempt <= 5 else "6+"
    CALLBACKS.labels(_bounded(event, CALLBACK_EVENTS), _bounded(outcome, CALLBACK_OUTCOMES), label).inc()


def observe_job(state: str) -> None:
    """A job entered `state` (one of `JOB_STATES`)."""
    _series_of(("job", state), lambda: JOBS.labels(_bounded(state, JOB_STATES))).inc()


# Queue depth is sampled rather than counted on every send/receive: the pipeline registers the
# send side of each bounded channel once, and the gauge is refreshed from the channels' own
# statistics at each scrape (and by `sample_queues_forever` with several processes).
_queues: dict[str, weakref.WeakSet[Any]] = {stage: weakref.WeakSet() for stage in QUEUE_STAGES}


def track_queue(stage: str, channel: Any) -> None:
    """Report the depth of a trio memory channel (either side) under `stage` (one of
    `QUEUE_STAGES`) for as long as the channel exists."""
    _queues.setdefault(_bounded(stage, QUEUE_STAGES), weakref.WeakSet()).add(channel)


def sample_queues() -> None:
    for stage, channels in _queues.items():
        depth = 0
        for channel in list(channels):
            stats = channel.statistics()
            if stats.open_send_channels or stats.open_receive_channels:
                depth += stats.current_buffer_used
        QUEUE_DEPTH.labels(stage).set(depth)


async def sample_queues_forever(interval: float = 1.0) -> None:
    """Refresh the queue gauge every `interval` seconds (multiprocess mode: a scrape reaches one
    process, the others must keep their files current)."""
    import trio

    while True:
        sample_queues()
        await trio.sleep(interval)


# --- HTTP (called by dispatcher.ops)


def observe_http(method: str, route: str, status: int, seconds: float) -> None:
    """`route` is a template (`/send/{id}`) or `unmatched`, never a raw path."""
    requests, latency = _series_of(("http", method, route, status), lambda: _http_series(method, route, status))
    requests.inc()
    latency.observe(max(seconds, 0.0))


def _http_series(method: str, route: str, status: int) -> tuple[Any, Any]:
    method = _bounded(method, HTTP_METHODS)
    return HTTP_REQUESTS.labels(method, route, str(status)), HTTP_LATENCY.labels(method, route)


# --- exposition


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def clear_multiprocess_dir() -> None:
    """Remove the sample files of a previous run (call once, before starting the workers)."""
    directory = multiprocess_dir()
    if directory:
        for path in Path(directory).glob("*.db"):
            path.unlink(missing_ok=True)


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges from the aggregate."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)


def registry() -> CollectorRegistry:
    """The registry to expose: this process's, or, in multiprocess mode, one that aggregates the
    files of every process."""
    if not multiprocess_dir():
        return REGISTRY
    aggregate = CollectorRegistry()
    multiprocess.MultiProcessCollector(aggregate)
    return aggregate


def render(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition (Prometheus text format, or OpenMetrics when `accept` asks for it) and its
    content type."""
    sample_queues()
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry()), content_type


__all__ = [
    "ATTEMPT_OUTCOMES",
    "DELIVERY_OUTCOMES",
    "FAILURE_KINDS",
    "JOB_STATES",
    "QUEUE_STAGES",
    "clear_multiprocess_dir",
    "deliveries_in_flight",
    "mark_process_dead",
    "observe_attempt",
    "observe_delivery",
    "observe_http",
    "observe_job",
    "observe_rate_limit_wait",
    "observe_retry",
    "render",
    "sample_queues",
    "sample_queues_forever",
    "track_queue",
    "track_send",
]
