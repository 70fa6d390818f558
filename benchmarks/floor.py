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
latency from each request's due time, and errors; then medians over the rounds and each
variant's ratio to the first one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from dispatcher.loadtest.cli import add_parser, options_from_args
from dispatcher.loadtest.drivers import PhaseStatus, run_stream
from dispatcher.loadtest.environment import open_environment
from dispatcher.loadtest.runner import _cpu_of
from dispatcher.loadtest.service import ProcessService, open_service

APP = Path(__file__).with_name("floor_app.py")


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def measure(variant: str, options: Any, env: Any, output: Path) -> dict[str, Any]:
    ledger = variant.endswith("-ledger")
    options = dataclasses.replace(options, ledger=ledger)
    command = None
    if variant.startswith("floor"):
        command = lambda config, port: [sys.executable, str(APP), str(config), str(port)] + ["--ledger"] * ledger  # noqa: E731
    async with open_service(options, env, output, command) as service:
        assert isinstance(service, ProcessService)
        pid = service.pid
        before = (_cpu_of(pid), _cpu_of(env.store_pid), time.process_time(), _cpu_of(env.fakes.pid))
        phase = await run_stream(service, env, options, PhaseStatus(variant))
        after = (_cpu_of(pid), _cpu_of(env.store_pid), time.process_time(), _cpu_of(env.fakes.pid))
    n = len(phase.exchanges)
    ok = [e for e in phase.exchanges if e.ok]
    latencies = [e.latency * 1000 for e in ok]

    def per_request(i: int) -> float | None:
        a, b = before[i], after[i]
        return None if a is None or b is None else (b - a) / n * 1000

    return {
        "variant": variant,
        "requests": n,
        "errors": n - len(ok),
        "service_cpu_ms": per_request(0),
        "store_cpu_ms": per_request(1),
        "harness_cpu_ms": per_request(2),
        "generator_cpu_ms": None if phase.generator_cpu is None else phase.generator_cpu / n * 1000,
        "fakes_cpu_ms": per_request(3),
        "p50_ms": _percentile(latencies, 0.5),
        "p99_ms": _percentile(latencies, 0.99),
    }


async def run(variants: list[str], rounds: int, options: Any, output: Path) -> list[list[dict[str, Any]]]:
    results: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="floor-") as scratch:
        async with open_environment(options, Path(scratch)) as env:
            for number in range(rounds):
                # Every other round in reverse order (ABC CBA ...): a machine that speeds up or slows
                # down during a round then favours no variant over the rounds.
                order = variants if number % 2 == 0 else variants[::-1]
                measured = {}
                for variant in order:
                    figures = await measure(variant, options, env, output)
                    print(json.dumps({"round": number + 1, **figures}), flush=True)
                    measured[variant] = figures
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
    args = parser.parse_args(own)
    loadtest = argparse.ArgumentParser()
    add_parser(loadtest.add_subparsers(dest="command"))
    options = options_from_args(
        loadtest.parse_args(["loadtest", "--scenario", "stream", "--no-progress", *loadtest_args])
    )
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    output = Path(tempfile.mkdtemp(prefix="floor-output-"))
    results = trio.run(run, variants, args.rounds, options, output)
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
    print(f"\nmedians over {args.rounds} round(s); ratio: to {variants[0]} within each round, then the median")
    print(f"{'variant':16}" + "".join(f"{k:>18}" for k in keys) + f"{'cpu ratio':>12}{'p50 ratio':>12}")
    for i, variant in enumerate(variants):
        column = [row[i] for row in results]
        medians = [statistics.median(f[k] for f in column if f[k] is not None) for k in keys]
        cpu_ratio = statistics.median(row[i]["service_cpu_ms"] / row[0]["service_cpu_ms"] for row in results)
        p50_ratio = statistics.median(row[i]["p50_ms"] / row[0]["p50_ms"] for row in results)
        print(f"{variant:16}" + "".join(f"{m:18.3f}" for m in medians) + f"{cpu_ratio:12.2f}{p50_ratio:12.2f}")


if __name__ == "__main__":
    main()
