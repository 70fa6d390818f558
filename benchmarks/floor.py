"""The service beside its floor, in one run: single-recipient sends offered open-loop at a fixed
rate to `benchmarks/floor_app.py` (what any implementation of such a send must do) and to the
real service, on the same store, fakes and load generator, interleaved round by round (every
other round in reverse order).

    python benchmarks/floor.py --rounds 3 --variants floor-ledger,service-ledger,service \\
        -- --users 2000 --rps 100 --duration 15s --latency 10ms --channels email,sms,push

Arguments after `--` are `dispatcher loadtest` options (the stream scenario is implied). Variants:
`floor`, `floor-ledger` (the floor with its claim and outcome writes), `service` (ledger off),
`service-ledger`. For each: the process's CPU per request, the store's, the fakes' (a process of
their own), the generator's (the open-loop process that sends the requests, as it measures
itself), the harness's (this process: it starts the generator and decodes the answers), p50/p99
latency from each request's due time, and errors (by status, with the first one's message);
then medians over the rounds and each variant's ratio to the first one. Each variant's service log
is kept in a directory named on the last line.

A variant `NAME@CHECKOUT` runs NAME from another checkout (a `git worktree` of another commit),
to compare two versions of the code in the same run.

`--together`: in each round all the variants run at the same time, each at `--rps`, each with a
generator of its own, on the one store and the one set of fakes. On a shared VM whose speed drifts
from minute to minute, variants measured one after another each catch a different minute: that
moved a round's ratio by ±0.15, more than the differences measured. Together they share the
minute (and the contention, symmetrically); the store's and the fakes' CPU then cannot be told
apart by variant and are reported for all of them together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from dispatcher.loadtest.cli import add_parser, options_from_args
from dispatcher.loadtest.drivers import Phase, PhaseStatus, run_stream
from dispatcher.loadtest.environment import open_environment
from dispatcher.loadtest.runner import _cpu_of
from dispatcher.loadtest.service import ProcessService, open_service, service_command

APP = Path(__file__).with_name("floor_app.py")


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _options_of(variant: str, options: Any) -> Any:
    return dataclasses.replace(options, ledger=variant.partition("@")[0].endswith("-ledger"))


def _command_of(variant: str, options: Any) -> Any:
    """The command that starts `variant` (None: this checkout's service). `NAME@CHECKOUT` runs
    NAME from another checkout of the project (another commit's code, side by side)."""
    name, _, checkout = variant.partition("@")
    if name.startswith("floor"):
        app = Path(checkout) / "benchmarks" / APP.name if checkout else APP
        ledger = ["--ledger"] * name.endswith("-ledger")
        return lambda config, port: [sys.executable, str(app), str(config), str(port), *ledger]
    if not checkout:
        return None
    # `-m` would put the working directory, this checkout, first on the path.
    start = f"import sys; sys.path.insert(0, {checkout!r}); from dispatcher.cli import main; sys.exit(main())"
    return lambda config, port: [
        sys.executable,
        "-c",
        start,
        *service_command(config, options.service_log_level, port)[3:],
    ]


def _cpus(pids: list[int | None]) -> list[float | None]:
    return [_cpu_of(pid) if pid is not None else None for pid in pids] + [time.process_time()]


async def measure(variants: list[str], options: Any, env: Any, output: Path) -> list[dict[str, Any]]:
    """Run `variants` (one or several at once) and measure each: the store's, the fakes' and this
    process's CPU per request are for all of them together."""
    phases: dict[str, Phase] = {}
    async with AsyncExitStack() as stack:
        services = []
        for variant in variants:
            logs = output / variant.replace("/", "_")
            logs.mkdir()
            service = await stack.enter_async_context(
                open_service(_options_of(variant, options), env, logs, _command_of(variant, options))
            )
            assert isinstance(service, ProcessService)
            services.append(service)
        pids = [s.pid for s in services] + [env.store_pid, env.fakes.pid]
        before = _cpus(pids)

        async def stream(variant: str, service: ProcessService) -> None:
            phases[variant] = await run_stream(service, env, _options_of(variant, options), PhaseStatus(variant))

        async with trio.open_nursery() as nursery:
            for variant, service in zip(variants, services, strict=True):
                nursery.start_soon(stream, variant, service)
        after = _cpus(pids)
    everything = sum(len(p.exchanges) for p in phases.values())

    def cpu_ms(i: int, n: int) -> float | None:
        a, b = before[i], after[i]
        return None if a is None or b is None else (b - a) / n * 1000

    figures = []
    for i, variant in enumerate(variants):
        phase = phases[variant]
        n = len(phase.exchanges)
        ok = [e for e in phase.exchanges if e.ok]
        latencies = [e.latency * 1000 for e in ok]
        failed = [e for e in phase.exchanges if not e.ok]
        figures.append(
            {
                "variant": variant,
                "requests": n,
                "errors": len(failed),
                # By status (0: no answer); the service's log is in `output`/`variant`.
                "errors_by_status": dict(Counter(e.reply.status for e in failed)),
                "first_error": failed[0].reply.error if failed else None,
                "service_cpu_ms": cpu_ms(i, n),
                "store_cpu_ms": cpu_ms(len(variants), everything),
                "fakes_cpu_ms": cpu_ms(len(variants) + 1, everything),
                "harness_cpu_ms": cpu_ms(len(variants) + 2, everything),
                "generator_cpu_ms": None if phase.generator_cpu is None else phase.generator_cpu / n * 1000,
                "p50_ms": _percentile(latencies, 0.5),
                "p99_ms": _percentile(latencies, 0.99),
            }
        )
    return figures


async def run(
    variants: list[str], rounds: int, options: Any, output: Path, together: bool
) -> list[list[dict[str, Any]]]:
    results: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="floor-") as scratch:
        async with open_environment(options, Path(scratch)) as env:
            for number in range(rounds):
                # Every other round in reverse order (ABC CBA ...): a machine that speeds up or slows
                # down during a round then favours no variant over the rounds.
                order = variants if number % 2 == 0 else variants[::-1]
                measured = {}
                for group in [order] if together else [[variant] for variant in order]:
                    round_output = output / f"round{number + 1}"
                    round_output.mkdir(exist_ok=True)
                    for figures in await measure(group, options, env, round_output):
                        print(json.dumps({"round": number + 1, **figures}), flush=True)
                        measured[figures["variant"]] = figures
                    await trio.to_thread.run_sync(env.clear_ledger)
                results.append([measured[variant] for variant in variants])
    return results


def main() -> None:
    argv = sys.argv[1:]
    loadtest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="floor-ledger,service-ledger,floor,service")
    parser.add_argument("--together", action="store_true", help="the variants of a round at the same time")
    args = parser.parse_args(own)
    loadtest = argparse.ArgumentParser()
    add_parser(loadtest.add_subparsers(dest="command"))
    options = options_from_args(
        loadtest.parse_args(["loadtest", "--scenario", "stream", "--no-progress", *loadtest_args])
    )
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    output = Path(tempfile.mkdtemp(prefix="floor-output-"))
    results = trio.run(run, variants, args.rounds, options, output, args.together)
    print(f"\nservices' logs: {output}")
    keys = (
        "service_cpu_ms",
        "store_cpu_ms",
        "generator_cpu_ms",
        "harness_cpu_ms",
        "fakes_cpu_ms",
        "p50_ms",
        "p99_ms",
        "errors",
    )
    print(f"medians over {args.rounds} round(s); ratio: to {variants[0]} within each round, then the median")
    print(f"{'variant':16}" + "".join(f"{k:>18}" for k in keys) + f"{'cpu ratio':>12}{'p50 ratio':>12}")
    for i, variant in enumerate(variants):
        column = [row[i] for row in results]
        medians = [statistics.median([f[k] for f in column if f[k] is not None] or [math.nan]) for k in keys]
        cpu_ratio = statistics.median(row[i]["service_cpu_ms"] / row[0]["service_cpu_ms"] for row in results)
        p50_ratio = statistics.median(row[i]["p50_ms"] / row[0]["p50_ms"] for row in results)
        print(f"{variant:16}" + "".join(f"{m:18.3f}" for m in medians) + f"{cpu_ratio:12.2f}{p50_ratio:12.2f}")


if __name__ == "__main__":
    main()
