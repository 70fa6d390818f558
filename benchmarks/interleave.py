"""Compare `dispatcher loadtest` configurations side by side: run them interleaved (A, B, A, B...),
each run a fresh harness (fakes, store, service), and print the medians and the median of each
round's ratio to the first variant. On a shared machine the load drifts over minutes; rounds that
alternate and ratios taken within a round are what hold up.

    python benchmarks/interleave.py --repeat 3 \\
        --common "--users 10000 --channels email,sms,push --latency 20ms" \\
        --variant "ledger on=--ledger on" --variant "ledger off=--ledger off"

Each variant is NAME=ARGS (ARGS added to --common). Results: one folder per run under --output,
and summary.json there. Each run records the load average (1 min) at its start: on a shared
machine, read the figures beside it. `--lock FILE` holds an exclusive `flock` on FILE for each
round (its variants back to back; `--rounds-per-lock N` for N rounds) and lets go in between, so
that other users of the machine can run in between while no one runs beside a measurement.

Old code against new: `--checkout NAME=PATH` runs variant NAME from the checkout at PATH (its
`dispatcher loadtest`, its service; PYTHONPATH and the working directory set to PATH).
`--checkout NAME=PATH:SERVICE` runs PATH's harness against the service of the checkout SERVICE, so
that two services are measured by the same harness: the harness runs from SERVICE as its working
directory with PATH first on its own sys.path, and a harness that starts the service with
`python -m dispatcher` from its working directory and keeps the fake providers in its own process
(the harness of c42fc0d does) starts SERVICE's code. E.g.

    python benchmarks/interleave.py --repeat 3 --lock /work/bench.lock \\
        --common "--users 5000 --channels email,sms,push --latency 20ms" \\
        --variant "old=" --variant "new=" --checkout old=../old-worktree --checkout new=.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """What a run is compared on (None where the scenario has no such figure)."""
    total, cpu, requests = results["total"], results.get("cpu", {}), results["requests"]
    limits = [c["rate_limit"] for c in results["channels"].values() if c.get("rate_limit")]
    row: dict[str, Any] = {
        "deliveries_per_s": total["deliveries_per_s"],
        "busy_deliveries_per_s": total.get("busy_deliveries_per_s"),
        "elapsed_s": results["duration_s"],
        "cpu_ms_per_delivery": cpu.get("service_ms_per_delivery"),
        "store_cpu_ms_per_delivery": cpu.get("store_ms_per_delivery"),
        "fakes_cpu_ms_per_delivery": cpu.get("fakes_ms_per_delivery"),
        "harness_cpu_ms_per_delivery": cpu.get("harness_ms_per_delivery"),
        "peak_rss_mb": results["memory"]["peak_rss_mb"],
        "idle_cores": results.get("machine", {}).get("idle_cores"),
        "steal_cores": results.get("machine", {}).get("steal_cores"),
        "checks_ok": results["checks"]["ok"],
    }
    if results["scenario"] == "stream":
        row.update(
            achieved_rps=requests["achieved_rps"],
            p50_ms=requests["latency"]["p50_ms"],
            p99_ms=requests["latency"]["p99_ms"],
            errors=requests["errors"],
        )
        # Per request, each process apart (the harness process is the load generator).
        for name in ("service", "store", "fakes", "redis", "harness"):
            if f"{name}_ms_per_request" in cpu:
                row[f"{name}_cpu_ms_per_request"] = cpu[f"{name}_ms_per_request"]
    if limits:
        row.update(
            rate_achieved=limits[0]["achieved"],
            rate_deviation_pct=limits[0]["deviation_pct"],
            max_in_1s=limits[0]["max_in_1s"],
            max_allowed_in_1s=limits[0]["max_allowed_in_1s"],
        )
    if "cluster" in results:
        row["redis_script_calls_per_delivery"] = results["cluster"]["script_calls_per_delivery"]
        row["redis_round_trips_per_delivery"] = results["cluster"].get("limiter_round_trips_per_delivery")
    return row


def run_once(
    arguments: list[str], output: Path, checkout: Path | None = None, service: Path | None = None
) -> dict[str, Any]:
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    loadtest = ["loadtest", *arguments, "--no-progress", "--output", str(output)]
    command = [sys.executable, "-m", "dispatcher", *loadtest]
    env, cwd = None, None
    if checkout is not None:
        # `python -m` puts the working directory first on sys.path: run from the checkout itself.
        env, cwd = {**os.environ, "PYTHONPATH": str(checkout)}, str(checkout)
    if checkout is not None and service is not None:
        # The harness imported from `checkout`, its `python -m dispatcher` children from `service`.
        start = f"import sys; sys.path.insert(0, {str(checkout)!r}); from dispatcher.cli import main; sys.exit(main())"
        command, cwd = [sys.executable, "-c", start, *loadtest], str(service)
    load = os.getloadavg()[0]
    # What the rest of the machine leaves idle just before the run (the harness's own figure is
    # missing from older checkouts).
    idle = psutil.cpu_times_percent(interval=1.0).idle / 100 * (os.cpu_count() or 1)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=cwd)  # 1: a check failed
    found = sorted(output.glob("*/results.json"))
    if not found:
        raise SystemExit(f"no results from {shlex.join(command)} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads(found[-1].read_text())
    row = figures(results)
    row["exit_code"] = done.returncode
    row["wall_s"] = round(time.monotonic() - started, 1)
    row["load_1m"] = round(load, 2)
    row["idle_cores_before"] = round(idle, 2)
    return row


@contextlib.contextmanager
def exclusive(path: Path | None) -> Any:
    """An exclusive flock on `path` for the block (nothing when None)."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _median(values: list[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return round(statistics.median(numbers), 4) if numbers else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--common", default="", help="arguments of every run")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("loadtest-results/interleaved"))
    parser.add_argument("--lock", type=Path, help="hold an exclusive flock on this file for each round")
    parser.add_argument(
        "--checkout", action="append", default=[], metavar="NAME=PATH[:SERVICE]", help="run variant NAME from PATH"
    )
    parser.add_argument(
        "--alternate", action="store_true", help="every other round runs the variants in reverse order (ABBA)"
    )
    parser.add_argument("--rounds-per-lock", type=int, default=1, help="rounds run under one hold of --lock")
    args = parser.parse_args()
    variants = [(name.strip(), shlex.split(rest)) for name, _, rest in (v.partition("=") for v in args.variant)]
    checkouts: dict[str, tuple[Path, Path | None]] = {}
    for name, _, paths in (c.partition("=") for c in args.checkout):
        harness, _, service = paths.partition(":")
        checkouts[name.strip()] = (Path(harness).resolve(), Path(service).resolve() if service else None)
    if unknown := set(checkouts) - {name for name, _ in variants}:
        parser.error(f"--checkout names no variant: {', '.join(sorted(unknown))}")
    common = shlex.split(args.common)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = args.output / stamp
    rounds: list[dict[str, dict[str, Any]]] = []
    per_lock = max(1, args.rounds_per_lock)
    for first in range(1, args.repeat + 1, per_lock):
        with exclusive(args.lock):
            for number in range(first, min(first + per_lock, args.repeat + 1)):
                entry = {}
                order = list(enumerate(variants))
                if args.alternate and number % 2 == 0:
                    order.reverse()  # neither variant always runs first after the lock was taken
                for index, (name, extra) in order:
                    row = run_once(
                        common + extra, root / f"round{number}-{index + 1}", *checkouts.get(name, (None, None))
                    )
                    entry[name] = row
                    print(f"round {number} {name}: " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                rounds.append(entry)

    keys = list(rounds[0][variants[0][0]])
    medians = {name: {k: _median([r[name].get(k) for r in rounds]) for k in keys} for name, _ in variants}
    base = variants[0][0]
    ratios = {}
    for name, _ in variants[1:]:
        ratios[name] = {}
        for key in keys:
            per_round = [
                r[name][key] / r[base][key]
                for r in rounds
                if isinstance(r[name].get(key), (int, float))
                and isinstance(r[base].get(key), (int, float))
                and not isinstance(r[name].get(key), bool)
                and r[base][key]
            ]
            if per_round:
                ratios[name][key] = {
                    "median": round(statistics.median(per_round), 4),
                    "rounds": [round(v, 4) for v in per_round],
                }
    summary = {
        "command": shlex.join(sys.argv),
        "common": common,
        "variants": dict(variants),
        "checkouts": {name: [str(p) for p in paths if p] for name, paths in checkouts.items()},
        "rounds": rounds,
        "medians": medians,
        f"ratios_to_{base}": ratios,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nmedians of {args.repeat} interleaved rounds:")
    for name, row in medians.items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    for name, row in ratios.items():
        print(
            f"  {name} / {base} (median of per-round ratios): "
            + ", ".join(f"{k}={v['median']} {v['rounds']}" for k, v in row.items())
        )
    print(f"summary: {root / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
