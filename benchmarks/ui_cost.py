"""What the operations page costs the service: the list of 1,000 jobs, and an open page polling.

    python benchmarks/ui_cost.py [--jobs 1000] [--rounds 5] [--polls 300]

Runs `dispatcher serve` as its own process on an in-memory embedded store (outbox providers),
creates JOBS finished sends (e-mail + SMS, one user each) through `POST /send`, then:

- list: reads every page of the jobs list (`GET /-/ui/?limit=200`, 5 pages for 1,000 jobs) and
  reports the service process's CPU time for the 1,000 jobs (and per page), and the store's;
- poll: starts a paced SMS campaign (500 users at 5/s) and asks `GET /-/ui/progress?id=...&detail=1`
  POLLS times back to back, as an open job page does every `[ui].poll_seconds`; the service's
  CPU per poll, times 0.5 polls per second, is what a page open at 2 s costs (% of one core).
  The same window without polls is measured beside it (ABAB): the campaign's own CPU per second.

CPU times are the processes' user + system time (psutil), so they hold however loaded the
machine is; wall times do not and are not reported as results.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pymongo

from dispatcher.embedded_store import EmbeddedServer
from process_cpu import cpu_seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(workdir: Path, store_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = workdir / "service.toml"
    config.write_text(
        f"""
[server]
port = {port}
[store]
data_dir = "{workdir / "var"}"
[sender]
email = "bench@example.com"
sms = "+15550009999"
[channels]
active = ["email", "sms"]
[channels.sms]
provider = "outbox"
rate_per_second = 5
[providers.outbox]
dir = "{workdir / "outbox"}"
"""
    )
    env = {**os.environ, "MONGODB_URL": store_url}
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "service.log", "w"),  # noqa: SIM115
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/-/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the service did not start; see {workdir / 'service.log'}")


def create_jobs(http: httpx.Client, n: int) -> None:
    body = {"channels": ["email", "sms"], "recipients": ["u0"], "messageTitle": "T", "messageContent": "Hi"}
    for _ in range(n):
        assert http.post("/send?async=true", json=body).status_code == 202
    while http.get("/send?status=running&limit=1").json()["jobs"]:
        time.sleep(0.5)


def list_all(http: httpx.Client) -> int:
    """Every page of the list, 200 jobs a page; the number of jobs shown."""
    shown, url = 0, "/-/ui/?limit=200"
    while url:
        response = http.get(url)
        assert response.status_code == 200
        html = response.text
        shown += html.count("<tr data-job=")
        marker = '<a rel="next" href="./'
        url = "/-/ui/" + html.split(marker, 1)[1].split('"', 1)[0].replace("&amp;", "&") if marker in html else ""
    return shown


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--polls", type=int, default=300)
    args = parser.parse_args()
    store = EmbeddedServer(None)
    workdir = Path(tempfile.mkdtemp(prefix="ui-cost-"))
    process = None
    try:
        users = pymongo.MongoClient(store.url)["messaging"]["users"]
        users.insert_many(
            [{"_id": f"u{i}", "emailAddress": f"u{i}@example.com", "phoneNumber": f"+1555{i:07d}"} for i in range(500)]
        )
        process, base = start_service(workdir, store.url)
        with httpx.Client(base_url=base, timeout=60) as http:
            started = time.monotonic()
            create_jobs(http, args.jobs)
            print(f"{args.jobs} jobs created in {time.monotonic() - started:.0f} s")
            list_all(http)  # warm: templates compiled, indexes built
            service_ms, store_ms = [], []
            for _ in range(args.rounds):
                before = cpu_seconds(process.pid), cpu_seconds(store.pid)
                shown = list_all(http)
                after = cpu_seconds(process.pid), cpu_seconds(store.pid)
                assert shown == args.jobs, shown
                service_ms.append((after[0] - before[0]) * 1000)
                store_ms.append((after[1] - before[1]) * 1000)
            pages = -(-args.jobs // 200)
            print(
                f"list of {args.jobs} jobs ({pages} pages of 200): service CPU median {statistics.median(service_ms):.0f} ms "
                f"(rounds {', '.join(f'{v:.0f}' for v in service_ms)}), "
                f"{statistics.median(service_ms) / pages:.0f} ms a page; store CPU median {statistics.median(store_ms):.0f} ms"
            )

            body = {"channels": ["sms"], "recipients": [f"u{i}" for i in range(500)], "messageContent": "Hi"}
            job_id = http.post("/send?async=true", json=body).json()["id"]
            time.sleep(2)
            poll = f"/-/ui/progress?id={job_id}&detail=1"
            per_poll, idle = [], []
            for _ in range(args.rounds):
                # B: the campaign alone, for as long as A's polls take.
                before, t0 = cpu_seconds(process.pid), time.monotonic()
                for _ in range(args.polls):
                    response = http.get(poll)
                    assert response.status_code == 200 and response.json()["jobs"][0]["state"] == "running"
                a_cpu, a_wall = cpu_seconds(process.pid) - before, time.monotonic() - t0
                before = cpu_seconds(process.pid)
                time.sleep(a_wall)
                b_cpu = cpu_seconds(process.pid) - before
                per_poll.append((a_cpu - b_cpu) / args.polls * 1000)
                idle.append(b_cpu / a_wall * 100)
            cost = statistics.median(per_poll) * 0.5 / 1000 * 100
            print(
                f"poll (progress of a running job, counts table included): service CPU median "
                f"{statistics.median(per_poll):.2f} ms a poll (rounds {', '.join(f'{v:.2f}' for v in per_poll)}); "
                f"a page polling every 2 s: {cost:.3f} % of a core; the campaign alone: "
                f"{statistics.median(idle):.1f} % of a core"
            )
            http.delete(f"/send/{job_id}")
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
        store.stop()


if __name__ == "__main__":
    main()
