"""The fan-out's service CPU per delivery with a given request text, from one or more checkouts,
interleaved (A B C A B C ...), medians at the end. The service's CPU includes its descendants
(render worker processes, through the harness's process sampler).

Run: python benchmarks/render_fanout.py LABEL=CHECKOUT[:TEXT] ... [--rounds 3] [--users 1000] [--lock FILE]
  TEXT: `plain` (the harness's own texts), `each` (the same body plus an empty Handlebars `#each`,
  which renders in worker processes), `jinja-for` (the same body plus an empty Jinja `for`, with
  `[templates].request_engine = "jinja"`: a worker process in the new code, a thread in the old).
  `--lock FILE`: an exclusive flock on FILE for each round (see interleave.py).
Example:
  python benchmarks/render_fanout.py old=/tmp/old new=.:plain new-workers=.:each --rounds 3

A fan-out still running after `[server].sync_timeout_seconds` (30 s) answers 202 and the harness
stops counting: on a loaded machine keep --users small, or give checkouts whose harness keeps the
`[server]` section of --base-config (`loadtest/config.py`, `_base_sections`), as this script
passes `sync_timeout_seconds = 3600` there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from interleave import exclusive

TEXTS = {
    "plain": None,
    "each": "Hi {{ user.name }}, your load-test code is {{ data.code }}.{{#each user.none}}{{/each}}",
    "jinja-for": "Hi {{ user.name }}, your load-test code is {{ data.code }}.{% for x in user.none %}{% endfor %}",
}

DRIVER = """
import sys
import dispatcher.loadtest.drivers as drivers
content = {content!r}
if content is not None:
    drivers.CONTENT = content
from dispatcher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(checkout: str, text: str, users: int, output: Path) -> dict[str, float]:

    env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
    args = ["loadtest", "--users", str(users), "--channels", "email,sms,push", "--latency", "20ms"]
    # A loaded machine: the synchronous answer must not run out (30 s) into a 202 mid fan-out.
    base = output / "base.toml"
    engine = '[templates]\nrequest_engine = "jinja"\n' if text == "jinja-for" else ""
    base.write_text("[server]\nsync_timeout_seconds = 3600\n" + engine)
    args += ["--no-progress", "--output", str(output), "--base-config", str(base)]
    code = DRIVER.format(content=TEXTS[text])
    load = os.getloadavg()[0]
    idle = psutil.cpu_times_percent(interval=1.0).idle / 100 * (os.cpu_count() or 1)
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=False, stdout=subprocess.DEVNULL, cwd="/tmp")
    [results] = list(output.glob("*/results.json"))
    data = json.loads(results.read_text())
    return {
        "service_ms_per_delivery": data["cpu"].get("service_ms_per_delivery"),
        "received": data["total"]["received"],
        "checks": {name: check.get("ok") for name, check in data.get("checks", {}).items() if isinstance(check, dict)},
        "requests": {k: v for k, v in data.get("requests", {}).items() if k in ("sent", "errors", "error_samples")},
        "load_1m": round(load, 2),
        "idle_cores_before": round(idle, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", help="LABEL=CHECKOUT[:TEXT]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--lock", type=Path, help="hold an exclusive flock on this file for each round")
    options = parser.parse_args()
    variants = []
    for spec in options.variants:
        label, rest = spec.split("=", 1)
        checkout, _, text = rest.partition(":")
        variants.append((label, checkout, text or "plain"))
    figures: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for round_ in range(options.rounds):
        with exclusive(options.lock):
            for label, checkout, text in variants:
                with tempfile.TemporaryDirectory() as tmp:
                    result = run(checkout, text, options.users, Path(tmp))
                print(f"round {round_ + 1} {label}: {result}", flush=True)
                if result["service_ms_per_delivery"] is not None:
                    figures[label].append(result["service_ms_per_delivery"])
    print("| variant | service CPU ms per delivery (median) | runs |")
    print("|---|---|---|")
    for label, values in figures.items():
        shown = ", ".join(f"{v:.3f}" for v in values)
        print(f"| {label} | {statistics.median(values):.3f} | {shown} |" if values else f"| {label} | - | |")


if __name__ == "__main__":
    main()
