"""Checks on what the service reported against what the fakes received.

- accounting: per channel, sent + skipped + failed equals the users selected, and the skips are
  exactly the users without an address there.
- exactly once: every delivery the service reported as sent reached a fake exactly once per
  address (a push user with k device tokens means k receipts), and nothing arrived twice.
  Receipts for deliveries reported as failed are counted apart: for a multi-device push whose
  other devices failed they are expected; otherwise the service reported a failure for a message
  that was in fact delivered (an attempt whose outcome was unknown, reported as such). On a
  channel whose `on_ambiguous` is `resend` (push by default) an attempt that may have reached the
  provider is sent again: duplicates there are counted as resent and do not fail the check.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .drivers import Exchange
from .population import Population

_PREFIXES = (
    (re.compile(r"^\d+ of \d+ devices failed"), "k of n devices failed"),
    (re.compile(r"^(.*?): no answer within"), None),
)


def failure_kind(error: str) -> str:
    """Group a failure text by its prefix: the provider and its code ('Twilio 21610',
    'SMTP 554', 'FCM UNREGISTERED'), marking those that outlasted their retries."""
    retried = "(after " in error and error.rstrip().endswith("attempts)")
    for pattern, label in _PREFIXES:
        match = pattern.match(error)
        if match:
            kind = label or f"{match[1]}: timeout"
            break
    else:
        kind = error.split(":", 1)[0].strip() or error
    return kind + (" (after retries)" if retried else "")


def failures_by_kind(failures: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts: Counter[str] = Counter(f"{f.get('channel')}: {failure_kind(str(f.get('error', '')))}" for f in failures)
    return dict(counts.most_common())


def failure_samples(failures: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """One full failure text per kind (the first seen), for what the kind's prefix leaves out."""
    samples: dict[str, str] = {}
    for f in failures:
        samples.setdefault(f"{f.get('channel')}: {failure_kind(str(f.get('error', '')))}", str(f.get("error", "")))
    return samples


def check_accounting(
    summary: Mapping[str, Any], channel: str, selected: int, expected_skipped: int | None
) -> dict[str, Any]:
    sent = int(summary.get("sent", {}).get(channel, 0))
    skipped = int(summary.get("skipped", {}).get(channel, 0))
    failed = int(summary.get("failed", {}).get(channel, 0))
    ok = sent + skipped + failed == selected and (expected_skipped is None or skipped == expected_skipped)
    return {
        "selected": selected,
        "sent": sent,
        "skipped": skipped,
        "failed": failed,
        "expected_skipped": expected_skipped,
        "ok": ok,
    }


def check_exactly_once(
    expected: Counter[str],
    received: Counter[str],
    sent: int,
    failed_addresses: Counter[str] | set[str],
    *,
    resend: bool = False,
) -> dict[str, Any]:
    """`expected` counts, per address, the deliveries reported sent; `received` what the fake got;
    `failed_addresses` counts, per address, the deliveries that may have arrived without being
    reported sent (failed as `outcome unknown`, or whose request got no answer): each may account
    for one receipt. Counted per address, not per address seen anywhere: a stream names a user
    in several requests, and a receipt of a request that timed out is not a duplicate of another
    request's (that was the "1 SMS received twice, reported sent once" of issue 17 item 6).
    `resend`: the channel sends ambiguous attempts again (at least once, by policy)."""
    maybe = failed_addresses if isinstance(failed_addresses, Counter) else Counter(failed_addresses)
    missing = {a: n - received.get(a, 0) for a, n in expected.items() if received.get(a, 0) < n}
    duplicated: dict[str, int] = {}
    delivered_but_failed: dict[str, int] = {}
    strays: dict[str, int] = {}
    for a, n in received.items():
        e, m = expected.get(a, 0), maybe.get(a, 0)
        if e == 0 and m == 0:
            strays[a] = n
            continue
        if n > e and m:
            delivered_but_failed[a] = min(n - e, m)
        if n > e + m:
            duplicated[a] = n - e - m
    ok = not missing and not strays and (resend or not duplicated)
    return {
        "ok": ok,
        "on_ambiguous": "resend" if resend else "report",
        "reported_sent": sent,
        "expected_receipts": sum(expected.values()),
        "distinct_addresses_expected": len(expected),
        "distinct_addresses_received": len([a for a in received if a in expected]),
        "missing": sum(missing.values()),
        "duplicated": sum(duplicated.values()),
        "received_for_failed_deliveries": sum(delivered_but_failed.values()),
        "received_for_unknown_addresses": sum(strays.values()),
        "examples": {
            "missing": sorted(missing)[:5],
            "duplicated": sorted(duplicated)[:5],
            "unknown": sorted(strays)[:5],
        },
    }


def expected_for_fanout(population: Population, channel: str, failed_users: set[int]) -> Counter[str]:
    expected: Counter[str] = Counter()
    for index in range(population.size):
        if index not in failed_users:
            expected.update(population.addresses(index, channel))
    return expected


def expected_for_stream(
    population: Population, channel: str, exchanges: Iterable[Exchange]
) -> tuple[Counter[str], int]:
    """Addresses of the stream requests on `channel` the service reported sent, and their number."""
    expected: Counter[str] = Counter()
    sent = 0
    for exchange in exchanges:
        if exchange.channel != channel or not exchange.ok or exchange.user_index is None:
            continue
        assert exchange.reply.body is not None
        if exchange.reply.body.get("summary", {}).get("sent", {}).get(channel, 0):
            sent += 1
            expected.update(population.addresses(exchange.user_index, channel))
    return expected, sent
