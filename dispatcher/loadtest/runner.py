"""One load-test run, from start to report: `await run_loadtest(options)`.

Order: fakes, store and population (and Redis for several processes), the service; then the
scenario (with the progress display and the process sampler running); then, with `compare`, the
baselines on the same fakes; `repeat` times over, interleaved; then the analysis, the JSON file
and the chart. With `kill_at`, one fan-out during which the service is killed and restarted.
Everything started is stopped on the way out, including on errors and Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import trio
from rich.console import Console

from ..errors import DispatcherError
from .analysis import analyse, thin
from .baselines import run_baseline
from .drivers import PhaseStatus, run_fanout, run_stream
from .environment import Environment, open_environment
from .durability import check_durability, run_fanout_killed
from .metrics import ProcessSampler, busy_rate, median, own_cpu_seconds, per_second
from .options import LoadTestOptions
from .progress import ProgressDisplay
from .report import print_report, write_chart, write_json
from .config import child_environment, embedded_settings
from .redis_server import script_calls, work_commands
from .service import ProcessService, RunningService, open_service

_BASELINE_LABELS = {
    "ceiling": "transport ceiling (bare provider loop)",
    "naive": "naive loop (query, render, send one at a time)",
    "apprise": "Apprise (e-mail, one notify per user, same concurrency)",
}


class LoadTestError(DispatcherError):
    """The run could not be completed (a baseline crashed, the service did not answer)."""


async def run_loadtest(options: LoadTestOptions, *, console: Console | None = None) -> dict[str, Any]:
    """Run the scenario (and the baselines), print the report, write the files; return the results."""
    console = console if console is not None else Console()
    started_at = dt.datetime.now(dt.UTC)
    output = options.output / f"{options.scenario}-{started_at:%Y%m%d-%H%M%S}"
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dispatcher-loadtest-") as scratch:
        console.print(f"starting fakes and seeding {options.users:,} users...")
        async with open_environment(options, Path(scratch)) as env:
            console.print(f"starting the service ({options.mode} mode)...")
            async with open_service(options, env, output) as service:
                results = await _measure(options, env, service, console, output)
    results["started_at"] = started_at.isoformat(timespec="seconds")
    results["files"] = {"json": str(output / "results.json"), "chart": str(output / "deliveries.png")}
    if options.mode == "process":
        results["files"]["service_config"] = str(output / "service-config.toml")
        if options.replicas == 1:
            results["files"]["service_log"] = str(output / "service.log")
        else:
            results["files"]["service_logs"] = [str(output / f"service-{i + 1}.log") for i in range(options.replicas)]
    write_chart(results, output / "deliveries.png")
    write_json(results, output / "results.json")
    print_report(results, console)
    return results


async def _measure(
    options: LoadTestOptions, env: Environment, service: RunningService, console: Console, output: Path
) -> dict[str, Any]:
    sampler = ProcessSampler(service.roots)
    display = ProgressDisplay(console, env.tap, options.channels, sampler, enabled=options.progress)
    async with trio.open_nursery() as nursery:
        await nursery.start(sampler.run)
        await nursery.start(display.run)
        if options.kill_at is not None:
            assert isinstance(service, ProcessService)
            results = await _killed_fanout(options, env, service, display, sampler)
        else:
            results = await _rounds(options, env, service, display, sampler, output)
        nursery.cancel_scope.cancel()
    return results


async def _rounds(
    options: LoadTestOptions,
    env: Environment,
    service: RunningService,
    display: ProgressDisplay,
    sampler: ProcessSampler,
    output: Path,
) -> dict[str, Any]:
    """`repeat` rounds of the scenario (and, with `compare`, the baselines after it), interleaved:
    pipeline, baselines, pipeline, baselines... The detailed figures are the first round's; the
    rounds and their medians come with them."""
    rounds: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for number in range(1, options.repeat + 1):
        label = options.scenario if options.repeat == 1 else f"{options.scenario} (round {number}/{options.repeat})"
        results = await _pipeline_phase(options, env, service, display, sampler, label)
        entry: dict[str, Any] = {"round": number, "pipeline": headline(results), "checks": dict(results["checks"])}
        if options.compare and results["requests"]["errors"] == 0:
            runs = await _baselines(options, env, service, display, output, number)
            entry["baselines"] = runs
            entry["ratios"] = _ratios(results, runs)
        elif options.compare:
            results["notes"].append("baselines skipped: the scenario's request failed")
        rounds.append(entry)
        if first is None:
            first = results
        if number < options.repeat and options.ledger is not False:
            # Later rounds write into an empty ledger too (the indexes stay).
            await trio.to_thread.run_sync(env.clear_ledger)
    assert first is not None
    checks = first["checks"]
    for key in checks:
        checks[key] = all(entry["checks"][key] for entry in rounds)
    if options.compare and "baselines" in rounds[0]:
        first["compare"] = _compare_section(options, rounds, first)
    if options.repeat > 1:
        first["rounds"] = rounds
        first["medians"] = _medians(rounds)
    return first


async def _pipeline_phase(
    options: LoadTestOptions,
    env: Environment,
    service: RunningService,
    display: ProgressDisplay,
    sampler: ProcessSampler,
    label: str,
) -> dict[str, Any]:
    status = PhaseStatus(label)
    display.set_phase(status)
    meter = await _Meter.start(env, sampler, service)
    if options.scenario == "fanout":
        phase = await run_fanout(service, env, status)
    else:
        phase = await run_stream(service, env, options, status)
    await meter.stop()
    await env.tap.refresh()
    if options.receipts_delay is not None:
        await _receipts_settled(env, options.receipts_delay)
    results = analyse(options, env, service, phase)
    meter.report(results, phase.generator_cpu)
    return results


async def _receipts_settled(env: Environment, delay: float) -> None:
    """Wait (a bounded time) for the fake Twilio's callbacks of what it created: two per message
    (`sent`, then the final status), one per call."""
    if not env.fakes.twilio_url:
        return
    with trio.move_on_after(delay + 30):
        while len(env.tap.callbacks) < env.tap.callbacks_due:
            await trio.sleep(0.05)
            await env.tap.refresh()


async def _killed_fanout(
    options: LoadTestOptions,
    env: Environment,
    service: ProcessService,
    display: ProgressDisplay,
    sampler: ProcessSampler,
) -> dict[str, Any]:
    status = PhaseStatus(f"fanout, SIGKILL at {options.kill_at:.0%}")
    display.set_phase(status)
    meter = await _Meter.start(env, sampler, service)
    phase, timeline = await run_fanout_killed(service, env, options, status)
    await meter.stop()
    results = analyse(options, env, service, phase)
    meter.report(results)
    results["notes"].append("service CPU and peak RSS cover both processes, the restart included")
    if "error" in timeline:
        return results
    settings = embedded_settings(service.config, env)
    policies = {c: settings.channels.on_ambiguous(c) for c in options.channels}
    failures = phase.exchanges[0].reply.body["failures"]  # type: ignore[index]
    received = {c: env.tap.since(phase.mark, c).counts() for c in options.channels}
    durability = check_durability(env.population, options.channels, received, failures, policies)
    results["durability"] = {**durability, "timeline": timeline}
    resent = [c for c, d in durability["channels"].items() if d["duplicates"] and d["on_ambiguous"] == "resend"]
    if resent:
        results["notes"].append(
            f"{', '.join(resent)}: on_ambiguous = resend, so what was in flight at the kill was "
            f"sent again (at least once, by design): exactly once does not apply there"
        )
    checks = results["checks"]
    checks["durability"] = durability["ok"]
    # Resent by policy (push) is not exactly once, by design: durability judges duplicates.
    checks["ok"] = checks["accounting"] and durability["ok"] and checks.get("rate_limit", True)
    return results


ROUND_TRIPS_METRIC = "dispatcher_redis_limit_round_trips_total"


class _Meter:
    """CPU time of each process over one measured phase: the service (its processes), the store,
    the fakes, Redis, the generator (the stream's process, as it measures itself) and the harness
    (this process); and the Redis round trips (as Redis counts its commands, and as each replica
    reports its own). `start` before the phase, `stop` right after it (before the harness analyses
    anything), `report` into the phase's results."""

    def __init__(self, env: Environment, sampler: ProcessSampler, service: RunningService) -> None:
        self.env, self.sampler, self.service = env, sampler, service
        self.service_cpu: dict[int, float] = {}
        self.service_s = self.system_s = 0.0
        self.service_system: dict[int, float] = {}
        self.per_root: list[float] = []
        # Other processes by name: CPU-seconds at the start, then used during the phase.
        self.others: dict[str, float | None] = {}
        self.harness = 0.0
        # The whole machine: its load average when the phase starts, its idle CPU over the phase.
        self.load_1m = 0.0
        self.idle = self.steal = self.wall = 0.0
        self.redis_calls: dict[str, int] = {}
        self.reported: list[float | None] = []

    @classmethod
    async def start(cls, env: Environment, sampler: ProcessSampler, service: RunningService) -> _Meter:
        meter = cls(env, sampler, service)
        if env.redis is not None:
            meter.redis_calls = await trio.to_thread.run_sync(env.redis.command_calls)
            meter.reported = await _reported_round_trips(service)
        meter.service_cpu = sampler.cpu_snapshot()
        meter.service_system = sampler.system_snapshot()
        meter.others = {name: _cpu_of(pid) for name, pid in meter._other_pids().items()}
        meter.harness = own_cpu_seconds()
        meter.load_1m = os.getloadavg()[0]
        meter.idle, meter.steal, meter.wall = *_idle_and_steal(), trio.current_time()
        return meter

    def _other_pids(self) -> dict[str, int | None]:
        env = self.env
        return {"store": env.store_pid, "fakes": env.fakes.pid, "redis": env.redis.pid if env.redis else None}

    async def stop(self) -> None:
        snapshot = self.service_cpu
        self.service_s = self.sampler.cpu_since(snapshot)
        self.system_s = self.sampler.system_since(self.service_system)
        self.per_root = [self.sampler.cpu_since(snapshot, root) for root in self.service.roots()]
        self.harness = own_cpu_seconds() - self.harness
        idle, steal = _idle_and_steal()
        self.idle, self.steal, self.wall = idle - self.idle, steal - self.steal, trio.current_time() - self.wall
        for name, pid in self._other_pids().items():
            start, end = self.others.get(name), _cpu_of(pid)
            self.others[name] = None if start is None or end is None else end - start
        if self.env.redis is not None:
            now = await trio.to_thread.run_sync(self.env.redis.command_calls)
            self.redis_calls = {name: n - self.redis_calls.get(name, 0) for name, n in now.items()}
            after = await _reported_round_trips(self.service)
            self.reported = [None if a is None or b is None else a - b for a, b in zip(after, self.reported)]

    def report(self, results: dict[str, Any], generator_s: float | None = None) -> None:
        """`generator_s`: the CPU-seconds of the generator process, when one sent the requests."""
        sampler, service = self.sampler, self.service
        received = results["total"]["received"]
        requests = results["requests"]["count"] if results["scenario"] == "stream" else 0

        def per_ms(seconds: float | None, count: int) -> float | None:
            return round(seconds / count * 1000, 4) if seconds is not None and count else None

        cpu: dict[str, Any] = {"service_system_s": round(self.system_s, 3)}
        # The generator's process (a stream to service processes) apart from the harness's: the
        # harness spawns it and decodes the answers (and, in embedded mode, runs the service and
        # sends the requests itself).
        named = [
            ("service", self.service_s),
            *self.others.items(),
            ("generator", generator_s),
            ("harness", self.harness),
        ]
        for name, seconds in named:
            if (name == "redis" and self.env.redis is None) or (name == "generator" and generator_s is None):
                continue
            cpu[f"{name}_s"] = None if seconds is None else round(seconds, 3)
            cpu[f"{name}_ms_per_delivery"] = per_ms(seconds, received)
            if requests:
                cpu[f"{name}_ms_per_request"] = per_ms(seconds, requests)
        cpu["measured"] = (
            "user + system CPU time per process (psutil): the service's processes, the store, the "
            "fakes (a process of their own), the harness (this process: in a fan-out, the load "
            "generator too); the stream's generator process by itself, from its first request's "
            "due time to its last answer"
            if service.mode == "process"
            else "embedded mode: the service runs in the harness process, with the load generator"
        )
        results["cpu"] = cpu
        results["machine"] = {
            "cpus": os.cpu_count(),
            "load_1m_at_start": round(self.load_1m, 2),
            # Cores that stood idle on average during the phase: what no process could use.
            # (Clamped: /proc/stat counts in ticks, the phase's span is measured on another clock.)
            "idle_cores": round(min(self.idle / self.wall, os.cpu_count() or 1), 2) if self.wall > 0 else None,
            # Time the hypervisor gave this machine's cores to others: on a shared host, CPU per
            # request rises with it.
            "steal_cores": round(self.steal / self.wall, 2) if self.wall > 0 else None,
        }
        for row, root, seconds in zip(results["replicas"], service.roots(), self.per_root):
            row["pid"] = root
            row["cpu_s"] = round(seconds, 3)
            row["peak_rss_mb"] = round(sampler.peak_of(root) / 2**20, 1)
        results["processes"] = sampler.processes()
        if self.env.redis is not None:
            calls, work = script_calls(self.redis_calls), work_commands(self.redis_calls)

            def per(n: int) -> float | None:
                return round(n / received, 4) if received else None

            results["cluster"] = {
                "redis": self.env.redis.url,
                "processes": len(results["processes"]),
                # Script runs: the limiter's reservations, and the shared fan-outs'.
                "script_calls": calls,
                "script_calls_per_delivery": per(calls),
                # Redis counts the commands a script runs too (GET, SET, TIME...):
                # a breakdown, not a count of round trips.
                "commands_incl_script_internals": dict(sorted(work.items(), key=lambda kv: -kv[1])),
            }
            for row, count in zip(results["replicas"], self.reported):
                row["redis_round_trips"] = None if count is None else round(count)
            if self.reported and all(n is not None for n in self.reported):
                # The services' own count (`Cluster.round_trips`, in /-/metrics): a check on Redis's.
                total = round(sum(self.reported))  # type: ignore[arg-type]
                results["cluster"]["limiter_round_trips"] = total
                results["cluster"]["limiter_round_trips_per_delivery"] = per(total)
        results["memory"] = {
            "peak_rss_bytes": sampler.peak,
            "peak_rss_mb": round(sampler.peak / 2**20, 1),
            "measured": service.memory_note,
            "pid": service.pid,
            "samples_mb": thin([(t, round(b / 2**20, 1)) for t, b in sampler.samples], 600),
        }


async def _reported_round_trips(service: RunningService) -> list[float | None]:
    if not isinstance(service, ProcessService):
        return []
    return [await service.metric(ROUND_TRIPS_METRIC, replica) for replica in range(service.replicas)]


def _idle_and_steal() -> tuple[float, float]:
    """CPU-seconds of the whole machine so far, every core together: idle, and stolen by the
    hypervisor."""
    times = psutil.cpu_times()
    return times.idle + getattr(times, "iowait", 0.0), getattr(times, "steal", 0.0)


def _cpu_of(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures of one phase that rounds are compared on."""
    total, cpu = results["total"], results.get("cpu", {})
    figures = {
        "received": total["received"],
        "elapsed_s": results["duration_s"],
        "deliveries_per_s": total["deliveries_per_s"],
        "busy_deliveries_per_s": total["busy_deliveries_per_s"],
        "cpu_s": cpu.get("service_s"),
        "cpu_ms_per_delivery": cpu.get("service_ms_per_delivery"),
        "store_cpu_ms_per_delivery": cpu.get("store_ms_per_delivery"),
        "fakes_cpu_ms_per_delivery": cpu.get("fakes_ms_per_delivery"),
        "generator_cpu_ms_per_delivery": cpu.get("generator_ms_per_delivery"),
        "harness_cpu_ms_per_delivery": cpu.get("harness_ms_per_delivery"),
        "idle_cores": results.get("machine", {}).get("idle_cores"),
        "steal_cores": results.get("machine", {}).get("steal_cores"),
    }
    if "email" in results["channels"]:
        figures["email_deliveries_per_s"] = results["channels"]["email"]["deliveries_per_s"]
    if results["scenario"] == "stream":
        figures["achieved_rps"] = results["requests"]["achieved_rps"]
        figures["p50_ms"] = results["requests"]["latency"]["p50_ms"]
        figures["p99_ms"] = results["requests"]["latency"]["p99_ms"]
        for name in ("service", "store", "fakes", "redis", "generator", "harness"):
            if f"{name}_ms_per_request" in cpu:
                figures[f"{name}_cpu_ms_per_request"] = cpu[f"{name}_ms_per_request"]
    if "cluster" in results:
        figures["redis_round_trips_per_delivery"] = results["cluster"].get("limiter_round_trips_per_delivery")
    return figures


async def _baselines(
    options: LoadTestOptions,
    env: Environment,
    service: RunningService,
    display: ProgressDisplay,
    output: Path,
    number: int,
) -> dict[str, Any]:
    kinds = ["ceiling", "naive"] + (["apprise"] if "email" in options.channels else [])
    runs: dict[str, Any] = {}
    for kind in kinds:
        status = PhaseStatus(
            f"baseline: {kind}" + (f" (round {number}/{options.repeat})" if options.repeat > 1 else "")
        )
        status.started = trio.current_time()
        display.set_phase(status)
        channels = ("email",) if kind == "apprise" else options.channels
        sample = options.apprise_sample if kind == "apprise" else options.naive_sample
        mark = await env.tap.mark()
        store_cpu = _cpu_of(env.store_pid)
        if options.mode == "process":
            run = await _baseline_in_child(kind, options, env, output, sample)
        else:
            settings = embedded_settings(service.config, env)
            run = dataclasses.asdict(await run_baseline(kind, settings, env.population, options.channels, sample))
        end = trio.current_time()
        store_end = _cpu_of(env.store_pid)
        await env.tap.refresh()
        received = {c: env.tap.since(mark, c) for c in channels}
        count = sum(len(r.times) for r in received.values())
        note = ""
        if run["sampled"]:
            note = (
                f"sample of {run['users']:,} e-mails"
                if kind == "apprise"
                else f"sample of the first {run['users']:,} users"
            )
        if kind == "apprise":
            note = ", ".join(filter(None, [note, f"{run['concurrency']} threads"]))
        busy = busy_rate({c: sorted(r.times) for c, r in received.items()})
        runs[kind] = {
            **run,
            "label": _BASELINE_LABELS[kind],
            "received": count,
            "deliveries_per_s": round(count / run["elapsed_s"], 2) if run["elapsed_s"] > 0 else None,
            "busy_deliveries_per_s": busy["deliveries_per_s"],
            "cpu_ms_per_delivery": round(run["cpu_s"] / count * 1000, 4) if count else None,
            "store_cpu_ms_per_delivery": (
                round((store_end - store_cpu) / count * 1000, 4)
                if count and store_cpu is not None and store_end is not None
                else None
            ),
            "note": note,
            # From when the baseline's own clock started (a child process starts up first).
            "series": {c: per_second(r.times, end - run["elapsed_s"], end) for c, r in received.items()},
        }
    return runs


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def _ratios(pipeline: dict[str, Any], runs: dict[str, Any]) -> dict[str, float | None]:
    """One round's ratios, pipeline against the baselines measured right after it."""
    ceiling, naive = runs["ceiling"], runs["naive"]
    ratios = {
        "cpu_per_delivery_vs_ceiling": _ratio(
            pipeline["cpu"]["service_ms_per_delivery"], ceiling["cpu_ms_per_delivery"]
        ),
        "busy_rate_vs_ceiling": _ratio(pipeline["total"]["busy_deliveries_per_s"], ceiling["busy_deliveries_per_s"]),
        "rate_vs_ceiling": _ratio(pipeline["total"]["deliveries_per_s"], ceiling["deliveries_per_s"]),
        "rate_vs_naive": _ratio(pipeline["total"]["deliveries_per_s"], naive["deliveries_per_s"]),
    }
    if "apprise" in runs:
        ratios["email_vs_apprise"] = _ratio(
            pipeline["channels"]["email"]["deliveries_per_s"], runs["apprise"]["deliveries_per_s"]
        )
    return ratios


_RATIO_LABELS = {
    "cpu_per_delivery_vs_ceiling": ("service CPU-seconds per delivery / transport ceiling's", "<= 1.15"),
    "busy_rate_vs_ceiling": ("pipeline / transport ceiling, while every lane is busy", ">= 0.80"),
    "rate_vs_ceiling": ("pipeline / transport ceiling, until the last channel finished", "-"),
    "rate_vs_naive": ("pipeline / naive loop (its latency bound: one send at a time)", "-"),
    "email_vs_apprise": ("pipeline e-mail / Apprise at the same concurrency", ">= 5"),
}


def _compare_section(
    options: LoadTestOptions, rounds: list[dict[str, Any]], pipeline: dict[str, Any]
) -> dict[str, Any]:
    measured = [entry for entry in rounds if "ratios" in entry]
    ratios = {}
    for name, (label, target) in _RATIO_LABELS.items():
        values = [entry["ratios"].get(name) for entry in measured]
        if all(v is None for v in values):
            continue
        ratios[name] = {"label": label, "target": target, "value": median(values), "rounds": values}
    if len(measured) > 1:
        pipeline["notes"].append(
            f"ratios: median of {len(measured)} interleaved rounds (pipeline, then each "
            f"baseline); the tables show round 1"
        )
    if any(options.errors_for(c).total > 0 for c in options.channels):
        pipeline["notes"].append(
            "errors were injected: the baselines neither retry nor pause on 429 as the "
            "pipeline does, so the ratios compare unlike work"
        )
    for kind, run in measured[0]["baselines"].items():
        if run["note"] and run["sampled"]:
            pipeline["notes"].append(f"{_BASELINE_LABELS[kind]}: measured on a {run['note']}")
    if options.mode == "embedded":
        pipeline["notes"].append(
            "embedded mode: the service, the baselines and the load generator share the harness "
            "process, and every CPU figure of theirs includes the others"
        )
    return {"runs": measured[0]["baselines"], "ratios": ratios}


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    medians: dict[str, Any] = {"pipeline": {}, "baselines": {}}
    for key in rounds[0]["pipeline"]:
        medians["pipeline"][key] = median([entry["pipeline"].get(key) for entry in rounds])
    for kind in rounds[0].get("baselines", {}):
        runs = [entry["baselines"][kind] for entry in rounds if kind in entry.get("baselines", {})]
        medians["baselines"][kind] = {
            key: median([run.get(key) for run in runs])
            for key in (
                "deliveries_per_s",
                "busy_deliveries_per_s",
                "cpu_ms_per_delivery",
                "store_cpu_ms_per_delivery",
                "received",
                "elapsed_s",
            )
        }
    return medians


async def _baseline_in_child(
    kind: str, options: LoadTestOptions, env: Environment, output: Path, sample: int
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "dispatcher.loadtest.baselines",
        kind,
        "--config",
        str(output / "service-config.toml"),
        "--users",
        str(options.users),
        "--channels",
        ",".join(options.channels),
        "--sample",
        str(sample),
    ]
    result = await trio.run_process(
        command, capture_stdout=True, capture_stderr=True, check=False, env=child_environment(env)
    )
    if result.returncode != 0:
        raise LoadTestError(
            f"baseline {kind} failed (exit {result.returncode}):\n{result.stderr.decode(errors='replace')[-3000:]}"
        )
    return json.loads(result.stdout)
