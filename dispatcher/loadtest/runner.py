"""One load-test run, from start to report: `await run_loadtest(options)`.

Order: fakes, store and population, the service; then the scenario (with the progress display
and the memory sampler running); then, with `compare`, the baselines on the same fakes; then the
analysis, the JSON file and the chart. Everything started is stopped on the way out, including
on errors and Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from ..errors import DispatcherError
from .analysis import analyse, thin
from .baselines import run_baseline
from .drivers import PhaseStatus, run_fanout, run_stream
from .environment import Environment, open_environment
from .metrics import RssSampler, per_second
from .options import LoadTestOptions
from .progress import ProgressDisplay
from .report import print_report, write_chart, write_json
from .config import child_environment, embedded_settings
from .service import RunningService, open_service

_BASELINE_LABELS = {"ceiling": "transport ceiling (bare provider loop)",
                    "naive": "naive loop (query, render, send one at a time)",
                    "apprise": "Apprise (e-mail, one notify per user)"}


class LoadTestError(DispatcherError):
    """The run could not be completed (a baseline crashed, the service did not answer)."""


async def run_loadtest(options: LoadTestOptions, *, console: Console | None = None) -> dict[str, Any]:
    """Run the scenario (and the baselines), print the report, write the files; return the results."""
    console = console if console is not None else Console()
    started_at = dt.datetime.now(dt.timezone.utc)
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
        results["files"].update(service_config=str(output / "service-config.toml"),
                                service_log=str(output / "service.log"))
    write_chart(results, output / "deliveries.png")
    write_json(results, output / "results.json")
    print_report(results, console)
    return results


async def _measure(options: LoadTestOptions, env: Environment, service: RunningService, console: Console,
                   output: Path) -> dict[str, Any]:
    rss = RssSampler(service.pid)
    display = ProgressDisplay(console, env.tap, options.channels, rss, enabled=options.progress)
    async with trio.open_nursery() as nursery:
        await nursery.start(rss.run)
        await nursery.start(display.run)
        status = PhaseStatus(options.scenario)
        display.set_phase(status)
        if options.scenario == "fanout":
            phase = await run_fanout(service, env, status)
        else:
            phase = await run_stream(service, env, options, status)
        rss.sample()
        peak_rss = rss.peak
        results = analyse(options, env, service, phase)
        results["memory"] = {"peak_rss_bytes": peak_rss, "peak_rss_mb": round(peak_rss / 2**20, 1),
                             "measured": service.memory_note, "pid": service.pid,
                             "samples_mb": thin([(t, round(b / 2**20, 1)) for t, b in rss.samples], 600)}
        if options.compare and results["requests"]["errors"] == 0:
            results["compare"] = await _compare(options, env, service, display, results, output)
        elif options.compare:
            results["notes"].append("baselines skipped: the scenario's request failed")
        nursery.cancel_scope.cancel()
    return results


async def _compare(options: LoadTestOptions, env: Environment, service: RunningService, display: ProgressDisplay,
                   pipeline: dict[str, Any], output: Path) -> dict[str, Any]:
    kinds = ["ceiling", "naive"] + (["apprise"] if "email" in options.channels else [])
    runs: dict[str, Any] = {}
    for kind in kinds:
        status = PhaseStatus(f"baseline: {kind}")
        status.started = trio.current_time()
        display.set_phase(status)
        channels = ("email",) if kind == "apprise" else options.channels
        sample = options.apprise_sample if kind == "apprise" else options.naive_sample
        mark = env.tap.mark()
        if options.mode == "process":
            run = await _baseline_in_child(kind, options, env, output, sample)
        else:
            settings = embedded_settings(service.config, env)
            run = dataclasses.asdict(await run_baseline(kind, settings, env.population, options.channels, sample))
        end = trio.current_time()
        received = {c: env.tap.since(mark, c) for c in channels}
        count = sum(len(r.times) for r in received.values())
        note = ""
        if run["sampled"]:
            note = (f"sample of {run['users']:,} e-mails" if kind == "apprise"
                    else f"sample of the first {run['users']:,} users")
        runs[kind] = {**run, "label": _BASELINE_LABELS[kind], "received": count,
                      "deliveries_per_s": round(count / run["elapsed_s"], 2) if run["elapsed_s"] > 0 else None,
                      "note": note,
                      # From when the baseline's own clock started (a child process starts up first).
                      "series": {c: per_second(r.times, end - run["elapsed_s"], end) for c, r in received.items()}}
        if note:
            pipeline["notes"].append(f"{_BASELINE_LABELS[kind]}: measured on a {note}")

    if any(options.errors_for(c).total > 0 for c in options.channels):
        pipeline["notes"].append("errors were injected: the baselines neither retry nor pause on 429 as the "
                                 "pipeline does, so the ratios compare unlike work")

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return round(numerator / denominator, 3) if numerator and denominator else None

    total = pipeline["total"]["deliveries_per_s"]
    ratios = {
        "pipeline_vs_ceiling": {"label": "pipeline / transport ceiling", "target": ">= 0.80",
                                "value": ratio(total, runs["ceiling"]["deliveries_per_s"])},
        "pipeline_vs_naive": {"label": "pipeline / naive loop", "target": ">= 20",
                              "value": ratio(total, runs["naive"]["deliveries_per_s"])},
    }
    if "apprise" in runs:
        ratios["email_vs_apprise"] = {"label": "pipeline e-mail / Apprise", "target": ">= 5",
                                      "value": ratio(pipeline["channels"]["email"]["deliveries_per_s"],
                                                     runs["apprise"]["deliveries_per_s"])}
    return {"runs": runs, "ratios": ratios}


async def _baseline_in_child(kind: str, options: LoadTestOptions, env: Environment, output: Path,
                             sample: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "dispatcher.loadtest.baselines", kind,
               "--config", str(output / "service-config.toml"), "--users", str(options.users),
               "--channels", ",".join(options.channels), "--sample", str(sample)]
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False,
                                    env=child_environment(env))
    if result.returncode != 0:
        raise LoadTestError(f"baseline {kind} failed (exit {result.returncode}):\n"
                            f"{result.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(result.stdout)
