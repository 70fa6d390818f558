"""From a measured phase to figures: per channel deliveries, rates and the rate-limit check,
the rate while every lane is busy, the accounting and exactly-once checks, request latencies
(per replica too) and failures by kind."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .accounting import (
    check_accounting,
    check_exactly_once,
    expected_for_fanout,
    expected_for_stream,
    failure_samples,
    failures_by_kind,
)
from .config import embedded_settings
from .drivers import Exchange, Phase
from .environment import Environment
from .metrics import busy_rate, latency_summary, max_in_window, mean_rate, per_second, percentile
from .options import LoadTestOptions
from .population import Population
from .receipts import ReceiptTap
from .service import RunningService


def thin(samples: Sequence[Any], limit: int) -> list[Any]:
    step = max(1, len(samples) // limit)
    return list(samples[::step])


def _channel_figures(env: Environment, phase: Phase, channel: str, config: dict[str, Any]) -> dict[str, Any]:
    receipts = env.tap.since(phase.mark, channel)
    times = sorted(receipts.times)
    active = (times[-1] - phase.start) if times else 0.0
    figures: dict[str, Any] = {
        "received": len(times),
        # Over the channel's own active span: channels finish at different times.
        "deliveries_per_s": round(len(times) / active, 2) if active > 0 else 0.0,
        "max_in_1s": max_in_window(times),
        "mean_rate": None if (rate := mean_rate(times)) is None else round(rate, 3),
        "rate_limit": None,
    }
    section = config["channels"].get(channel, {})
    limit = float(section.get("rate_per_second", 0) or 0)
    if limit > 0:
        burst = int(section.get("burst", 1))
        achieved = figures["mean_rate"]
        deviation = None if achieved is None else (achieved - limit) / limit * 100
        figures["rate_limit"] = {
            "rate": limit,
            "burst": burst,
            "achieved": achieved,
            "deviation_pct": None if deviation is None else round(deviation, 3),
            "within_2pct": deviation is not None and abs(deviation) <= 2.0,
            "max_in_1s": figures["max_in_1s"],
            "max_allowed_in_1s": limit + burst,
            "window_ok": figures["max_in_1s"] <= limit + burst,
            # Arrivals are stamped by the fakes' event loop: gaps far below 1/rate mean
            # arrivals bunched up on the way (scheduling jitter), which can tip a window over.
            "gap_ms": _gaps(times),
        }
    return figures


def _gaps(sorted_times: Sequence[float]) -> dict[str, float | None]:
    gaps = sorted(b - a for a, b in zip(sorted_times, sorted_times[1:]))

    def ms(q: float) -> float | None:
        value = percentile(gaps, q)
        return None if value is None else round(value * 1000, 2)

    return {"min": ms(0), "p1": ms(1), "p50": ms(50), "max": ms(100)}


def _channel_accounting(
    scenario: str, population: Population, channel: str, ok: list[Exchange], failed_users: set[int]
) -> tuple[dict[str, Any], Counter[str], int]:
    """(accounting check, receipts expected per address, deliveries reported sent) for `channel`."""
    if scenario == "fanout":
        if not ok:
            return check_accounting({}, channel, 0, 0), Counter(), 0
        summary = merged_summary(ok)
        accounting = check_accounting(
            summary, channel, population.size, population.size - population.with_address(channel)
        )
        return accounting, expected_for_fanout(population, channel, failed_users), accounting["sent"]
    # stream: each request selects one user who has an address on its channel.
    on_channel = [e for e in ok if e.channel == channel]
    totals: dict[str, dict[str, int]] = {"sent": {}, "skipped": {}, "failed": {}}
    for exchange in on_channel:
        summary = exchange.reply.body.get("summary", {})  # type: ignore[union-attr]
        for key, counts in totals.items():
            counts[channel] = counts.get(channel, 0) + summary.get(key, {}).get(channel, 0)
    expected, sent = expected_for_stream(population, channel, on_channel)
    return check_accounting(totals, channel, len(on_channel), 0), expected, sent


def _may_have_arrived(
    scenario: str, population: Population, channel: str, exchanges: Sequence[Exchange], failures: list[dict[str, Any]]
) -> Counter[str]:
    """Per address, the deliveries that may have reached the fake without being reported sent:
    each failure of the channel (a fan-out reports a user once; an `outcome unknown` may have
    arrived), and, in a stream, each request to the address that got no answer."""
    maybe: Counter[str] = Counter()
    for f in failures:
        if f.get("channel") == channel and (i := population.index_of(str(f.get("userId")))) is not None:
            maybe.update(population.addresses(i, channel))
    if scenario == "stream":
        for e in exchanges:
            if e.channel == channel and not e.ok and e.user_index is not None:
                maybe.update(population.addresses(e.user_index, channel))
    return maybe


def merged_summary(exchanges: Sequence[Exchange]) -> dict[str, Any]:
    """The summaries of a fan-out's requests added up (one per replica, each to its shards)."""
    merged: dict[str, Any] = {"users": 0, "sent": {}, "skipped": {}, "failed": {}}
    for exchange in exchanges:
        summary = exchange.reply.body.get("summary", {})  # type: ignore[union-attr]
        merged["users"] += int(summary.get("users", 0))
        for key in ("sent", "skipped", "failed"):
            for channel, count in summary.get(key, {}).items():
                merged[key][channel] = merged[key].get(channel, 0) + count
    return merged


def _per_replica(options: LoadTestOptions, exchanges: list[Exchange], replicas: int) -> list[dict[str, Any]]:
    rows = []
    for replica in range(replicas):
        mine = [e for e in exchanges if e.replica == replica]
        row: dict[str, Any] = {
            "replica": replica + 1,
            "requests": len(mine),
            "errors": sum(1 for e in mine if not e.ok),
            "latency": latency_summary([e.latency for e in mine]),
        }
        rows.append(row)
    return rows


def _requests(options: LoadTestOptions, exchanges: list[Exchange], duration: float) -> dict[str, Any]:
    errors = [e for e in exchanges if not e.ok]
    requests: dict[str, Any] = {
        "count": len(exchanges),
        "ok": len(exchanges) - len(errors),
        "errors": len(errors),
        "error_samples": sorted({f"{e.reply.status}: {e.reply.error}" for e in errors})[:5],
        # From the time each request was due (stream: open-loop schedule) to its answer.
        "latency": latency_summary([e.latency for e in exchanges]),
    }
    ok = [e for e in exchanges if e.ok]
    if options.scenario == "stream":
        requests["offered_rps"] = options.rps
        requests["achieved_rps"] = round(len(exchanges) / duration, 2) if duration > 0 else None
        requests["service_time"] = latency_summary([e.finished - e.started for e in exchanges])
        requests["users_per_request_ok"] = all(e.reply.body.get("summary", {}).get("users") == 1 for e in ok)  # type: ignore[union-attr]
    elif ok:
        requests["users_selected"] = merged_summary(ok)["users"]
    return requests


def receipt_figures(tap: ReceiptTap) -> dict[str, Any]:
    """The status callbacks the fake Twilio posted (`--receipts`) as the service answered them:
    how many, how many it took (204), at what rate, and the final statuses they carried."""
    finals = Counter(c.status for c in tap.callbacks if c.status != "sent")
    times = [c.time for c in tap.callbacks]
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    answered = sum(1 for c in tap.callbacks if c.answer == 204)
    return {
        "posted": len(tap.callbacks),
        "answered": answered,
        "per_s": round(answered / span, 1) if span > 0 else None,
        "delivered": finals.get("delivered", 0) + finals.get("completed", 0),
        "undelivered": sum(n for status, n in finals.items() if status not in ("delivered", "completed")),
    }


def analyse(options: LoadTestOptions, env: Environment, service: RunningService, phase: Phase) -> dict[str, Any]:
    population = env.population
    ok = [e for e in phase.exchanges if e.ok]
    failures = [f for e in ok for f in e.reply.body.get("failures", [])]  # type: ignore[union-attr]
    duration = phase.end - phase.start
    channels: dict[str, Any] = {}
    series: dict[str, list[int]] = {}
    settings = embedded_settings(service.config, env)
    for channel in options.channels:
        resend = settings.channels.on_ambiguous(channel) == "resend"
        failed_users = {
            i
            for f in failures
            if f.get("channel") == channel and (i := population.index_of(str(f.get("userId")))) is not None
        }
        accounting, expected, sent = _channel_accounting(options.scenario, population, channel, ok, failed_users)
        receipts = env.tap.since(phase.mark, channel)
        failed_addresses = _may_have_arrived(options.scenario, population, channel, phase.exchanges, failures)
        channels[channel] = {
            **{k: accounting[k] for k in ("sent", "skipped", "failed", "selected", "expected_skipped")},
            "accounting_ok": accounting["ok"],
            **_channel_figures(env, phase, channel, service.config),
            "exactly_once": check_exactly_once(expected, receipts.counts(), sent, failed_addresses, resend=resend),
        }
        series[channel] = per_second(receipts.times, phase.start, phase.end)
    requests = _requests(options, phase.exchanges, duration)
    receipt_summary = receipt_figures(env.tap) if options.receipts_delay is not None and env.fakes.twilio_url else None
    accounting_ok = bool(ok) and all(c["accounting_ok"] for c in channels.values())
    if options.scenario == "fanout":
        accounting_ok = accounting_ok and requests.get("users_selected") == population.size
    else:
        accounting_ok = accounting_ok and requests["users_per_request_ok"]
    exactly_once_ok = bool(ok) and all(c["exactly_once"]["ok"] for c in channels.values())
    # Never more than rate + burst in any second at the fakes: with several processes, the
    # cluster-wide (shared) limit.
    rate_limit_ok = all(c["rate_limit"]["window_ok"] for c in channels.values() if c["rate_limit"])
    total_received = sum(c["received"] for c in channels.values())
    busy = busy_rate({c: sorted(env.tap.since(phase.mark, c).times) for c in options.channels})
    notes = []
    if options.mode == "embedded":
        notes.append("embedded mode: peak RSS is the harness process, which also runs the load generator")
    if options.processes > 1:
        shared = (
            ", and the fan-out (sent to replica 1) is shared by every process" if options.scenario == "fanout" else ""
        )
        notes.append(
            f"{options.replicas} replica(s) x {options.workers or 1} worker(s) share one Redis: rate limits "
            f"are cluster-wide, concurrency is per process{shared}"
        )
    return {
        "scenario": options.scenario,
        "options": jsonable(dataclasses.asdict(options)),
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "service": {"mode": service.mode, "config": service.config, "generator": service.generator},
        "population": {
            "users": population.size,
            "with_address": {c: population.with_address(c) for c in options.channels},
        },
        "duration_s": round(duration, 3),
        "requests": requests,
        "channels": channels,
        "total": {
            "sent": sum(c["sent"] for c in channels.values()),
            "failed": sum(c["failed"] for c in channels.values()),
            "received": total_received,
            # Until the last channel finished: diluted by the slowest lane's tail.
            "deliveries_per_s": round(total_received / duration, 2) if duration > 0 else 0.0,
            # While every channel was delivering: what the pipeline sustains.
            "busy_deliveries_per_s": busy["deliveries_per_s"],
            "busy_window_s": busy["window_s"],
        },
        "replicas": _per_replica(options, phase.exchanges, service.replicas),
        **({"receipts": receipt_summary} if receipt_summary is not None else {}),
        "failures_by_kind": failures_by_kind(failures),
        "failure_samples": failure_samples(failures),
        "checks": {
            "accounting": accounting_ok,
            "exactly_once": exactly_once_ok,
            "rate_limit": rate_limit_ok,
            "ok": accounting_ok and exactly_once_ok and rate_limit_ok,
        },
        "series": {"start": "scenario start", "bin_seconds": 1, "per_second": series},
        "notes": notes,
    }


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
