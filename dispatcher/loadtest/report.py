"""The end of a run: the results as rich tables on the console, a JSON file, and a PNG chart of
deliveries per second over time per channel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _mb(value: int | None) -> str:
    return "-" if not value else f"{value / 2**20:,.1f} MB"


def print_report(results: dict[str, Any], console: Console) -> None:
    scenario = results["scenario"]
    deliveries = Table(
        title=f"{scenario}: deliveries ({results['service']['mode']} mode, "
        f"{results['population']['users']:,} users, {results['duration_s']:.1f} s)"
    )
    for column in (
        "channel",
        "sent",
        "skipped",
        "failed",
        "received",
        "deliveries/s",
        "max in 1 s",
        "rate limit",
        "exactly once",
    ):
        deliveries.add_column(column, justify="left" if column in ("channel", "rate limit") else "right")
    for channel, c in results["channels"].items():
        limit = c.get("rate_limit")
        if limit:
            limit_text = (
                f"{limit['rate']:g}/s+{limit['burst']}: achieved {_fmt(limit['achieved'], 2)}/s "
                f"({_fmt(limit['deviation_pct'], 2)}%), max 1 s {limit['max_in_1s']}, "
                f"min gap {_fmt(limit['gap_ms']['min'], 1)} ms "
                f"[{'ok' if limit['within_2pct'] and limit['window_ok'] else 'OFF'}]"
            )
        else:
            limit_text = "-"
        once = c["exactly_once"]
        if once["ok"]:
            once_text = f"yes ({once['duplicated']} resent)" if once["duplicated"] else "yes"
        else:
            once_text = (
                f"NO: {once['missing']} missing, {once['duplicated']} twice, "
                f"{once['received_for_unknown_addresses']} unknown"
            )
        deliveries.add_row(
            channel,
            _fmt(c["sent"]),
            _fmt(c["skipped"]),
            _fmt(c["failed"]),
            _fmt(c["received"]),
            _fmt(c["deliveries_per_s"]),
            _fmt(c["max_in_1s"]),
            limit_text,
            once_text,
        )
    total = results["total"]
    deliveries.add_row(
        "total",
        _fmt(total["sent"]),
        "",
        _fmt(total["failed"]),
        _fmt(total["received"]),
        _fmt(total["deliveries_per_s"]),
        "",
        "",
        _fmt(results["checks"]["exactly_once"]),
        style="bold",
    )
    console.print(deliveries)

    requests = results["requests"]
    latency = requests["latency"]
    summary = Table(title="requests and memory", show_header=False)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    summary.add_row("requests (errors)", f"{requests['count']:,} ({requests['errors']:,})")
    if scenario == "stream":
        summary.add_row(
            "offered / achieved rate", f"{requests['offered_rps']:g} / {_fmt(requests['achieved_rps'])} req/s"
        )
    summary.add_row(
        "latency p50 / p95 / p99 / max",
        " / ".join(f"{_fmt(latency[k], 1)}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")) + " ms",
    )
    memory = results["memory"]
    summary.add_row(f"peak RSS ({memory['measured']})", _mb(memory["peak_rss_bytes"]))
    cpu = results.get("cpu")
    if cpu:
        # Each process apart: the service, the store, the fakes, Redis, the stream's generator
        # process, the harness (in a fan-out or embedded, the generator too).
        names = [n for n in ("service", "store", "fakes", "redis", "generator", "harness") if f"{n}_s" in cpu]
        label = " / ".join(names)
        for unit in ("request", "delivery"):
            if f"service_ms_per_{unit}" in cpu:
                summary.add_row(
                    f"CPU per {unit}: {label}",
                    " / ".join(_fmt(cpu[f"{n}_ms_per_{unit}"], 3) for n in names) + " ms",
                )
    summary.add_row("load generator", results["service"].get("generator", "-"))
    machine = results.get("machine")
    if machine:
        summary.add_row(
            "machine: cores idle / stolen by the hypervisor during the run; load average at its start",
            f"{_fmt(machine['idle_cores'], 2)} / {_fmt(machine.get('steal_cores'), 2)} of {machine['cpus']}; "
            f"{_fmt(machine['load_1m_at_start'], 2)}",
        )
    summary.add_row(
        "deliveries/s while every channel is busy",
        f"{_fmt(total['busy_deliveries_per_s'])} (over {_fmt(total['busy_window_s'], 1)} s)",
    )
    cluster = results.get("cluster")
    if cluster:
        summary.add_row(
            "Redis per delivery: limiter round trips (services' count) / script calls (Redis's)",
            f"{_fmt(cluster.get('limiter_round_trips_per_delivery'), 3)} / "
            f"{_fmt(cluster['script_calls_per_delivery'], 3)}",
        )
    summary.add_row("accounting (sent+skipped+failed = selected)", _fmt(results["checks"]["accounting"]))
    for sample in requests.get("error_samples", []):
        summary.add_row("error", sample)
    console.print(summary)

    if len(results.get("replicas", [])) > 1:
        table = Table(title="per replica (the harness's round robin)")
        for column in ("replica", "pid", "requests", "errors", "p99", "CPU", "peak RSS", "Redis round trips"):
            table.add_column(column, justify="right")
        for row in results["replicas"]:
            table.add_row(
                str(row["replica"]),
                str(row.get("pid", "-")),
                _fmt(row["requests"]),
                _fmt(row["errors"]),
                f"{_fmt(row['latency']['p99_ms'])} ms",
                f"{_fmt(row.get('cpu_s'), 2)} s",
                f"{_fmt(row.get('peak_rss_mb'))} MB",
                _fmt(row.get("redis_round_trips")),
            )
        console.print(table)

    receipts = results.get("receipts")
    if receipts:
        console.print(
            f"receipts (Twilio status callbacks): {receipts['answered']:,} of {receipts['posted']:,} taken, "
            f"{_fmt(receipts['per_s'])}/s; final: delivered {receipts['delivered']:,}, "
            f"undelivered {receipts['undelivered']:,}"
        )

    durability = results.get("durability")
    if durability:
        timeline = durability["timeline"]
        table = Table(
            title=f"durability: SIGKILL after {timeline['received_at_kill']:,} receipts "
            f"({timeline['killed_after_s']:.1f} s), restarted in {timeline['restart_s']:.1f} s, "
            f"resumed {_fmt(timeline['resumed_after_s'])} s later, job {timeline['status']}"
        )
        columns = (
            "channel",
            "on_ambiguous",
            "duplicates",
            "lost",
            "ambiguous at kill",
            "reconciled found/absent",
            "outcome unknown",
            "of which received",
            "ok",
        )
        for column in columns:
            table.add_column(column, justify="left" if column in ("channel", "on_ambiguous") else "right")
        at_kill = timeline.get("ambiguous_at_kill", {})
        reconciled = timeline.get("reconciled", {})
        for channel, c in durability["channels"].items():
            dup = _fmt(c["duplicates"]) + (
                " (resent by policy)" if c["duplicates"] and c["on_ambiguous"] == "resend" else ""
            )
            table.add_row(
                channel,
                c["on_ambiguous"],
                dup,
                _fmt(c["lost"]),
                _fmt(at_kill.get(channel)),
                "{found}/{absent}".format(**reconciled[channel]) if channel in reconciled else "–",
                _fmt(c["outcome_unknown"]),
                _fmt(c["outcome_unknown_received"]),
                _fmt(c["ok"]),
            )
        console.print(table)

    if results["failures_by_kind"]:
        failures = Table(title="failures by kind")
        failures.add_column("channel: kind")
        failures.add_column("count", justify="right")
        for kind, count in results["failures_by_kind"].items():
            failures.add_row(kind, _fmt(count))
        console.print(failures)

    compare = results.get("compare")
    if compare:
        table = Table(title="baselines (same fakes, same concurrency)")
        for column in ("measurement", "users", "received", "time", "deliveries/s", "note"):
            table.add_column(column, justify="left" if column in ("measurement", "note") else "right")
        table.add_row(
            "pipeline (all channels)",
            _fmt(results["population"]["users"]),
            _fmt(total["received"]),
            f"{results['duration_s']:.2f} s",
            _fmt(total["deliveries_per_s"]),
            "",
        )
        if "email" in results["channels"]:
            table.add_row(
                "pipeline (e-mail)",
                "",
                _fmt(results["channels"]["email"]["received"]),
                "",
                _fmt(results["channels"]["email"]["deliveries_per_s"]),
                "",
            )
        for run in compare["runs"].values():
            table.add_row(
                run["label"],
                _fmt(run["users"]),
                _fmt(run["received"]),
                f"{run['elapsed_s']:.2f} s",
                _fmt(run["deliveries_per_s"]),
                run["note"],
            )
        console.print(table)
        ratios = Table(title="ratios (benchmarks, not pass/fail)")
        for column in ("ratio", "median", "rounds", "target"):
            ratios.add_column(column, justify="left" if column == "ratio" else "right")
        for _name, ratio in compare["ratios"].items():
            value = "-" if ratio["value"] is None else f"{ratio['value']:.2f}"
            rounds = " ".join("-" if v is None else f"{v:.2f}" for v in ratio["rounds"])
            ratios.add_row(ratio["label"], value, rounds, ratio["target"])
        console.print(ratios)
    medians = results.get("medians")
    if medians:
        table = Table(title=f"medians of {len(results['rounds'])} interleaved rounds")
        for column in ("measurement", "deliveries/s", "busy deliveries/s", "CPU ms/delivery", "store CPU ms/delivery"):
            table.add_column(column, justify="left" if column == "measurement" else "right")
        m = medians["pipeline"]
        table.add_row(
            "pipeline (service)",
            _fmt(m["deliveries_per_s"]),
            _fmt(m["busy_deliveries_per_s"]),
            _fmt(m["cpu_ms_per_delivery"], 3),
            _fmt(m["store_cpu_ms_per_delivery"], 3),
        )
        for kind, b in medians["baselines"].items():
            table.add_row(
                kind,
                _fmt(b["deliveries_per_s"]),
                _fmt(b["busy_deliveries_per_s"]),
                _fmt(b["cpu_ms_per_delivery"], 3),
                _fmt(b["store_cpu_ms_per_delivery"], 3),
            )
        console.print(table)
    for note in results.get("notes", []):
        console.print(f"[dim]note:[/dim] {note}")
    files = results.get("files", {})
    if files:
        console.print(f"results: {files.get('json')}  chart: {files.get('chart')}")


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Deliveries per second over time, one line per channel, one panel per measured phase."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    panels = [
        (
            f"{results['scenario']} ({results['service']['mode']} mode)",
            results["series"]["per_second"],
            results["duration_s"],
        )
    ]
    for run in (results.get("compare") or {}).get("runs", {}).values():
        if run.get("series"):
            panels.append((run["label"], run["series"], run["elapsed_s"]))
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (title, series, duration) in zip(axes[:, 0], panels):
        longest = max((len(v) for v in series.values()), default=0)
        rates = {channel: _rates(values, duration) for channel, values in series.items()}
        if len(series) > 1:
            rates["total"] = _rates(
                [sum(v[i] if i < len(v) else 0 for v in series.values()) for i in range(longest)], duration
            )
        for channel, values in rates.items():
            edges = [float(i) for i in range(len(values) + 1)]
            if values and 0.05 < duration - (len(values) - 1) < 1.0:
                edges[-1] = duration  # a partial last bin, drawn as wide as it was
            ax.stairs(
                values, edges, label=channel, **({"color": "black", "linewidth": 1} if channel == "total" else {})
            )
        ax.set_title(title)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("deliveries / s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _rates(counts: list[int], duration: float) -> list[float]:
    """Per-second counts as rates; the last bin, when partial, is divided by its real width."""
    rates = [float(c) for c in counts]
    last = duration - (len(counts) - 1)
    if rates and 0.05 < last < 1.0:
        rates[-1] = counts[-1] / last
    return rates
