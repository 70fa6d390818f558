"""`--kill-at F`: durable sends under a real crash.

The fan-out is submitted asynchronously (`POST /send?async=true`, so the job id is known); once
the fraction F of the deliveries the population expects has reached the fakes, the service gets
SIGKILL (no drain, nothing flushed), is started again with the same command and configuration,
and resumes the job once the dead owner's lease (`[store].lease_seconds`, short here) expired.
The store and the fakes are other processes: they live through the kill.

Then, per (user, channel), from what the fakes received and what the job reports:

- duplicate: an address of the user received the message more than once. On a channel whose
  `on_ambiguous` is `resend` (push by default) a delivery in flight at the kill is sent again by
  design (at least once), so its duplicates are counted apart and do not fail the check;
- loss: some address received nothing although the job does not report the delivery failed
  (this includes a delivery reported sent that never arrived);
- outcome unknown: failures reported as `outcome unknown: ...` (a delivery the kill left
  `sending`, on a `report` channel), and how many of those did reach the fake;
- before and after reconciliation: the deliveries the kill left `sending` (read from the ledger
  between the kill and the restart) against the `outcome unknown` reported at the end; on a
  `reconcile` channel (Twilio) each was `found` at the provider or provably `absent` (sent then).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import trio

from ..errors import DispatcherError
from .drivers import Exchange, Phase, PhaseStatus, fanout_payload
from .environment import Environment
from .options import LoadTestOptions
from .population import Population
from .service import ProcessService, Reply

FINAL_STATES = ("done", "failed", "cancelled")
UNKNOWN_PREFIX = "outcome unknown"
_POLL_SECONDS = 0.2
# How often the harness asks the fakes' process for its count while it waits to kill: each
# question costs both processes a little CPU; a few more deliveries before the kill do no harm.
_KILL_POLL_SECONDS = 0.02
_FAILURES_PAGE = 1000


class KillError(DispatcherError):
    """The kill could not be staged (the job ended first, or its status could not be read)."""


def expected_receipts(population: Population, channels: Sequence[str]) -> int:
    return sum(len(population.addresses(i, c)) for i in range(population.size) for c in channels)


async def _received(env: Environment, mark: Mapping[str, int], channels: Sequence[str]) -> int:
    await env.tap.refresh()
    return sum(env.tap.count(c) - mark.get(c, 0) for c in channels)


async def run_fanout_killed(
    service: ProcessService, env: Environment, options: LoadTestOptions, status: PhaseStatus
) -> tuple[Phase, dict[str, Any]]:
    """Submit the fan-out, kill the service at the fraction, restart it, wait for the job's end.
    Returns the phase (one exchange whose body is the job's final summary and every failure)
    and the timeline."""
    assert options.kill_at is not None
    channels = options.channels
    target = math.ceil(options.kill_at * expected_receipts(env.population, channels))
    status.requests_total = 1
    mark = await env.tap.mark()
    phase = Phase("fanout", trio.current_time(), mark=mark)
    status.started = phase.start
    submitted = await service.request("POST", "/send?async=true", fanout_payload(channels))
    if submitted.status != 202 or submitted.body is None:
        phase.end = trio.current_time()
        phase.exchanges.append(Exchange(None, None, phase.start, phase.start, phase.end, submitted))
        status.request_errors = 1
        return phase, {"error": submitted.error}
    job_id = str(submitted.body["id"])
    status.name = f"fanout, SIGKILL at {options.kill_at:.0%} ({target:,} receipts)"

    checked = trio.current_time()
    while await _received(env, phase.mark, channels) < target:
        if trio.current_time() - checked >= 0.5:  # a job that ends early never reaches the target
            checked = trio.current_time()
            job = await _status(service, job_id)
            if job["status"] in FINAL_STATES and await _received(env, phase.mark, channels) < target:
                raise KillError(
                    f"the job ended ({job['status']}) before {options.kill_at:.0%} of the deliveries "
                    f"reached the fakes: lower --kill-at, or slow the fakes down (--latency)"
                )
        await trio.sleep(_KILL_POLL_SECONDS)
    killed_at = trio.current_time()
    killed_pid = service.pid
    await service.processes[0].kill()
    received_at_kill = await _received(env, phase.mark, channels)
    # Ambiguous at the kill: what the dead run left `sending` (before any reconciliation).
    at_kill = await trio.to_thread.run_sync(env.ambiguity, job_id)
    status.name = "fanout, restarting the service"
    await service.restart()
    restarted_at = trio.current_time()
    status.name = "fanout, waiting for the resumed job"
    with trio.move_on_after(options.request_timeout) as waiting:
        while (job := await _status(service, job_id))["status"] not in FINAL_STATES:
            await trio.sleep(_POLL_SECONDS)
    if waiting.cancelled_caught:
        raise KillError(
            f"the resumed job {job_id} did not finish within {options.request_timeout:g}s (see service.log)"
        )
    failures = await _failures(service, job_id)
    after = await trio.to_thread.run_sync(env.ambiguity, job_id)
    phase.end = trio.current_time()
    body = {"summary": job["summary"], "failures": failures}
    phase.exchanges.append(Exchange(None, None, phase.start, phase.start, phase.end, Reply(200, body)))
    status.requests_done = 1

    await env.tap.refresh()
    first_after = [t for c in channels for t in env.tap.since(phase.mark, c).times if t >= restarted_at]
    timeline = {
        "job": job_id,
        "status": job["status"],
        "kill_at_fraction": options.kill_at,
        "kill_target_receipts": target,
        "killed_pid": killed_pid,
        "restarted_pid": service.pid,
        "killed_after_s": round(killed_at - phase.start, 3),
        "received_at_kill": received_at_kill,
        "restart_s": round(restarted_at - killed_at, 3),
        # From the restart until the resumed job's first delivery: the dead owner's lease expiring.
        "resumed_after_s": round(min(first_after) - restarted_at, 3) if first_after else None,
        "finished_after_s": round(phase.end - phase.start, 3),
        "lease_seconds": options.kill_lease_seconds,
        "ambiguous_at_kill": {c: at_kill.get(c, {}).get("sending", 0) for c in channels},
        "reconciled": {c: {k: after.get(c, {}).get(k, 0) for k in ("found", "absent")} for c in channels},
        "receipts": {k: job["summary"].get(k, {}) for k in ("delivered", "undelivered", "unconfirmed")},
    }
    return phase, timeline


async def _status(service: ProcessService, job_id: str) -> dict[str, Any]:
    # A dead or restarting service answers nothing for a moment: ask again.
    for _ in range(50):
        reply = await service.request("GET", f"/send/{job_id}")
        if reply.status == 200 and reply.body is not None:
            return reply.body
        if reply.status not in (0, 502, 503):
            break
        await trio.sleep(_POLL_SECONDS)
    raise KillError(f"GET /send/{job_id}: {reply.status} {reply.error}")


async def _failures(service: ProcessService, job_id: str) -> list[dict[str, Any]]:
    failures: list[dict[str, Any]] = []
    after = ""
    while True:
        query = f"?limit={_FAILURES_PAGE}" + (f"&after={quote(after, safe='')}" if after else "")
        reply = await service.request("GET", f"/send/{job_id}/failures{query}")
        if reply.status != 200 or reply.body is None:
            raise KillError(f"GET /send/{job_id}/failures: {reply.status} {reply.error}")
        failures.extend(reply.body["failures"])
        after = reply.body.get("next") or ""
        if not after:
            return failures


def check_durability(
    population: Population,
    channels: Sequence[str],
    received: Mapping[str, Counter[str]],
    failures: Sequence[Mapping[str, Any]],
    policies: Mapping[str, str],
) -> dict[str, Any]:
    """Duplicates, losses and outcome-unknown deliveries per channel (see the module docstring);
    `received` counts the fakes' receipts per address, `policies` is each channel's on_ambiguous."""
    report: dict[str, Any] = {}
    for channel in channels:
        errors = {
            population.index_of(str(f.get("userId"))): str(f.get("error", ""))
            for f in failures
            if f.get("channel") == channel
        }
        counts = received.get(channel, Counter())
        duplicates: list[str] = []
        lost: list[str] = []
        unknown_received = 0
        for index in range(population.size):
            addresses = population.addresses(index, channel)
            if not addresses:
                continue
            got = [counts.get(a, 0) for a in addresses]
            if any(n > 1 for n in got):
                duplicates.append(population.user_id(index))
            error = errors.get(index)
            if error is None and any(n == 0 for n in got):
                lost.append(population.user_id(index))
            if error is not None and error.startswith(UNKNOWN_PREFIX) and any(got):
                unknown_received += 1
        unknown = sum(1 for e in errors.values() if e.startswith(UNKNOWN_PREFIX))
        policy = policies.get(channel, "report")
        failing_duplicates = 0 if policy == "resend" else len(duplicates)
        report[channel] = {
            "on_ambiguous": policy,
            "duplicates": len(duplicates),
            "lost": len(lost),
            "outcome_unknown": unknown,
            "outcome_unknown_received": unknown_received,
            "failed": len(errors),
            "ok": failing_duplicates == 0 and not lost,
            "examples": {"duplicates": duplicates[:5], "lost": lost[:5]},
        }
    totals = {
        key: sum(c[key] for c in report.values())
        for key in ("duplicates", "lost", "outcome_unknown", "outcome_unknown_received")
    }
    totals["duplicates_failing"] = sum(c["duplicates"] for c in report.values() if c["on_ambiguous"] != "resend")
    return {"ok": all(c["ok"] for c in report.values()), "channels": report, "total": totals}
