"""`dispatcher loadtest`: the command line of the load-test harness.

Registered on the main parser by `add_parser`; `run` builds its own configuration for the
service (it never reads the service's `config.toml`, unless given as a base) and runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

DESCRIPTION = """\
See what a configuration sustains before pointing it at real providers. Starts fake providers
(an SMTP sink, fake Twilio, fake FCM with its OAuth token endpoint) with the latency and error mix
you choose, seeds synthetic users into an in-memory store (4% without e-mail, 10% without phone,
12.5% without device token, 1 in 5 with 2-3 devices), starts the service (a separate process, or
embedded), drives it, and reports deliveries per second per channel, request latency, peak RSS,
failures by kind, an exactly-once check (every delivery reported sent reached a fake exactly
once), rate-limit adherence (never more than rate + burst in a second, across every process),
the service's CPU-seconds per delivery and, with --compare, baselines. --repeat interleaves
rounds and reports medians; --replicas/--workers run several service processes sharing a Redis;
--kill-at SIGKILLs the service mid fan-out and checks the resumed job. Writes results.json and
deliveries.png (plus the service's generated configuration and log) to a new folder under
--output. Exits 1 when the accounting, exactly-once, rate-limit or durability check fails."""

EPILOG = """\
examples:
  dispatcher loadtest --users 10000 --latency 20ms --compare
  dispatcher loadtest --scenario stream --rps 200 --duration 30s --latency 10ms
  dispatcher loadtest --users 3000 --channels sms --rate sms=100 --burst sms=1
  dispatcher loadtest --users 2000 --errors permanent=0.01,transient=0.02,throttle=0.002 --retry-after 0.5
  dispatcher loadtest --users 10000 --latency 20ms --compare --repeat 3
  dispatcher loadtest --users 3000 --latency 20ms --kill-at 0.5
  dispatcher loadtest --users 3000 --channels sms --rate sms=100 --replicas 3
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the `loadtest` subcommand to the main parser's subparsers."""
    p = commands.add_parser(
        "loadtest",
        help="measure what a configuration sustains, against fake providers",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scenario = p.add_argument_group("scenario")
    scenario.add_argument(
        "--scenario",
        choices=("fanout", "stream"),
        default="fanout",
        help="fanout: one POST /send to every seeded user (cluster 'loadtest') on the "
        "selected channels; stream: many single-recipient, single-channel sends at "
        "--rps for --duration, open-loop (default: fanout)",
    )
    scenario.add_argument(
        "--mode",
        choices=("process", "embedded"),
        default="process",
        help="process: run `python -m dispatcher serve` as a separate process on a free port "
        "and drive it over HTTP; embedded: call the embedding API "
        "(open_dispatcher) in this process (default: process)",
    )
    scenario.add_argument(
        "--users", type=int, default=1000, metavar="N", help="synthetic users to seed (default: 1000)"
    )
    scenario.add_argument(
        "--channels",
        default="email,sms,push",
        metavar="LIST",
        help="comma-separated channels among email, sms, push, voice (default: email,sms,push)",
    )
    scenario.add_argument(
        "--rps", type=float, default=200.0, metavar="R", help="stream: requests offered per second (default: 200)"
    )
    scenario.add_argument(
        "--duration",
        default="30s",
        metavar="TIME",
        help="stream: how long to offer requests, e.g. 30s, 2m (default: 30s)",
    )
    scenario.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="service processes on their own ports, addressed round-robin by the harness (a "
        "fan-out is one request, which the processes share through Redis). More than one "
        "process starts a Redis (redis-server on PATH) for the cluster-wide rate limits "
        "and shared fan-outs (default: 1)",
    )
    scenario.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="pass --workers N to `dispatcher serve` (if this version has it); figures cover every worker",
    )
    scenario.add_argument(
        "--redis",
        action="store_true",
        help="start a Redis and run the service in cluster mode even with one process (the "
        "fair base for comparing 1 process with several)",
    )
    scenario.add_argument(
        "--kill-at",
        type=float,
        metavar="F",
        help="fanout: SIGKILL the service once the fraction F of the expected deliveries has "
        "reached the fakes, restart it (same configuration, [store].lease_seconds = "
        "--kill-lease), wait for the resumed job, and report duplicates, losses and "
        "'outcome unknown' failures; exit 1 on a loss, or a duplicate on a channel whose "
        "on_ambiguous is 'report'",
    )
    scenario.add_argument(
        "--receipts",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the fake Twilio posts signed status callbacks (sent, then delivered, 2%% undelivered) "
        "SECONDS after each create to the service's /providers/twilio/status "
        "([providers.twilio].status_callback_base_url set to the service); the report counts them",
    )
    scenario.add_argument(
        "--kill-lease",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="[store].lease_seconds with --kill-at (default: 2)",
    )
    scenario.add_argument(
        "--clients",
        type=int,
        default=64,
        metavar="N",
        help="stream: requests in flight at most (HTTP connections); a request due while "
        "all are busy waits, and its latency counts the wait (default: 64)",
    )

    fakes = p.add_argument_group("fake providers")
    fakes.add_argument(
        "--latency",
        default="0ms",
        metavar="TIME",
        help="how long the fakes take to answer: fixed (20ms, 0.1s) or uniform in a range (10ms-30ms) (default: 0ms)",
    )
    fakes.add_argument(
        "--errors",
        default="",
        metavar="SPEC",
        help="error mix, probabilities per request: permanent=P (Twilio 21610, FCM "
        "INVALID_ARGUMENT, SMTP 554), transient=P (503 / SMTP 451), throttle=P (429 with "
        "Retry-After / SMTP 421), comma-separated; prefix a channel for one only "
        "(sms.permanent=0.05); later entries win; '2%%' works (default: none)",
    )
    fakes.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the Retry-After the fakes send with a 429 (default: 1)",
    )

    service = p.add_argument_group("service configuration (unset: the service's defaults, or --base-config's)")
    service.add_argument(
        "--base-config",
        type=Path,
        metavar="TOML",
        help="take [dispatcher], [channels.*] (not their providers), [templates] and "
        "[providers.smtp].pool_size from this configuration file; the store, server and "
        "providers are always the harness's (default: the top-level --config if given)",
    )
    service.add_argument(
        "--concurrency",
        default="",
        metavar="N|CH=N,...",
        help="[channels.<ch>].concurrency: deliveries in flight per channel, for every channel "
        "(16) or some (email=8,push=64)",
    )
    service.add_argument(
        "--rate",
        default="",
        metavar="CH=R,...",
        help="[channels.<ch>].rate_per_second, e.g. sms=100; the report then checks the rate "
        "achieved at the fake and the most deliveries in any 1-second window",
    )
    service.add_argument("--burst", default="", metavar="CH=N,...", help="[channels.<ch>].burst, e.g. sms=5")
    service.add_argument(
        "--smtp-pool-size", type=int, metavar="N", help="[providers.smtp].pool_size: persistent SMTP connections"
    )
    service.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="[channels.*].timeout_seconds: per attempt, every channel"
    )
    service.add_argument(
        "--max-attempts",
        type=int,
        metavar="N",
        help="[channels.*].max_attempts: attempts for transient errors, every channel",
    )
    service.add_argument(
        "--backoff", type=float, metavar="SECONDS", help="[channels.*].backoff_initial_seconds, every channel"
    )
    service.add_argument(
        "--ledger",
        choices=("on", "off"),
        help="[store].ledger: record jobs and deliveries in the store (default: the service's, on)",
    )
    service.add_argument("--queue-size", type=int, metavar="N", help="[dispatcher].queue_size")
    service.add_argument("--store-batch-size", type=int, metavar="N", help="[dispatcher].store_batch_size")
    service.add_argument(
        "--service-log-level",
        default="WARNING",
        metavar="LEVEL",
        help="log level of the service (process mode: in service.log) (default: WARNING)",
    )

    compare = p.add_argument_group("baselines (fanout only)")
    compare.add_argument(
        "--compare",
        action="store_true",
        help="also measure, on the same fakes: the transport ceiling (the same provider "
        "classes at the same concurrency in a bare loop over pre-rendered messages), a "
        "naive loop (one store query, Jinja2, one send at a time) and Apprise (the same "
        "e-mails to the same SMTP sink, from as many threads as the e-mail channel has "
        "connections), and report the ratios, CPU-seconds per delivery included",
    )
    compare.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="measure N rounds, interleaved (the scenario, then each baseline, then the scenario "
        "again...), and report medians and each round's ratios (default: 1)",
    )
    compare.add_argument(
        "--naive-sample",
        type=int,
        default=500,
        metavar="N",
        help="users the naive loop sends to (it is slow; its rate is what counts) (default: 500)",
    )
    compare.add_argument(
        "--apprise-sample", type=int, default=500, metavar="N", help="e-mails Apprise sends (default: 500)"
    )

    harness = p.add_argument_group("harness")
    harness.add_argument(
        "--output",
        type=Path,
        default=Path("loadtest-results"),
        metavar="DIR",
        help="results go to DIR/<scenario>-<UTC time>/ (default: loadtest-results)",
    )
    harness.add_argument("--no-progress", action="store_true", help="no live display while running")
    harness.add_argument("--seed", type=int, default=1, help="seed of the fakes' random draws (default: 1)")
    harness.add_argument(
        "--request-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long one request may take before it counts as an error (default: 3600)",
    )
    return p


def options_from_args(args: argparse.Namespace) -> Any:
    from .options import LoadTestOptions, OptionError, parse_channel_values, parse_duration, parse_errors, parse_latency

    def parsed(option: str, parse: Any, *extra: Any) -> Any:
        try:
            return parse(getattr(args, option.lstrip("-").replace("-", "_")), *extra)
        except OptionError as exc:
            message = str(exc)
            raise OptionError(message if message.startswith("--") else f"{option}: {message}") from None

    channels = tuple(c.strip() for c in args.channels.split(",") if c.strip())
    base = args.base_config or (Path(args.config) if getattr(args, "config", None) else None)
    return LoadTestOptions(
        scenario=args.scenario,
        mode=args.mode,
        users=args.users,
        channels=channels,
        latency=parsed("--latency", parse_latency),
        errors=parsed("--errors", parse_errors, channels),
        retry_after=args.retry_after,
        concurrency=parsed("--concurrency", parse_channel_values, int, channels),
        rate=parsed("--rate", parse_channel_values, float, channels),
        burst=parsed("--burst", parse_channel_values, int, channels),
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        backoff=args.backoff,
        smtp_pool_size=args.smtp_pool_size,
        queue_size=args.queue_size,
        store_batch_size=args.store_batch_size,
        ledger=None if args.ledger is None else args.ledger == "on",
        replicas=args.replicas,
        workers=args.workers,
        redis=args.redis,
        repeat=args.repeat,
        kill_at=args.kill_at,
        kill_lease_seconds=args.kill_lease,
        receipts_delay=args.receipts,
        base_config=base,
        rps=args.rps,
        duration=parsed("--duration", parse_duration),
        clients=args.clients,
        compare=args.compare,
        naive_sample=args.naive_sample,
        apprise_sample=args.apprise_sample,
        output=args.output,
        progress=not args.no_progress,
        seed=args.seed,
        request_timeout=args.request_timeout,
        service_log_level=args.service_log_level.upper(),
    )


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


# What the harness needs beyond the service: the `loadtest` extra, absent from a core install.
EXTRA_MODULES = ("rich", "matplotlib", "psutil", "apprise", "tomli_w")


def missing_extra() -> list[str]:
    """The modules of the `loadtest` extra that cannot be imported."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def run(args: argparse.Namespace) -> int:
    """Run `dispatcher loadtest`; 0 when the checks hold, 1 when they do not or the run failed,
    2 for a bad option or a missing extra, 130 on Ctrl-C."""
    missing = missing_extra()
    if missing:
        print(
            f"dispatcher loadtest: needs the 'loadtest' extra (missing {', '.join(missing)}): "
            f"pip install 'trio-dispatcher[loadtest]'",
            file=sys.stderr,
        )
        return 2
    import trio
    from rich.console import Console
    from rich.logging import RichHandler

    from ..errors import ConfigError, DispatcherError
    from .options import OptionError
    from .runner import run_loadtest

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))  # logs and CI: keep the tables readable
    try:
        options = options_from_args(args)
    except (OptionError, ValueError) as exc:
        print(f"dispatcher loadtest: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=options.service_log_level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    try:
        results = trio.run(partial(run_loadtest, options, console=console))
    except BaseException as exc:  # noqa: BLE001 - unwrapping the nursery's groups
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            console.print("interrupted: everything the harness started was stopped")
            return 130
        known = [leaf for leaf in leaves if isinstance(leaf, DispatcherError)]
        if known and len(known) == len(leaves):
            code = 2 if any(isinstance(leaf, ConfigError) for leaf in known) else 1
            for leaf in known:
                print(f"dispatcher loadtest: {leaf}", file=sys.stderr)
            return code
        raise
    if not results["checks"]["ok"]:
        failed = ", ".join(name for name, ok in results["checks"].items() if name != "ok" and not ok)
        console.print(f"[bold red]check failed:[/] {failed} (see the tables)")
        return 1
    return 0
