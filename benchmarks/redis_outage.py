"""What a short Redis outage costs a shared send (issue 17 item 5): SMS at 100/s to 1,000 users,
shared by two dispatchers' partition workers (one process, two `open_dispatcher`s on one Redis and
one embedded store, as two replicas would be), Redis SIGKILLed once a quarter has been sent and
restarted empty 3.2 s later. Counted at the outbox (the fake provider) and in the ledger.

    python benchmarks/redis_outage.py [ROUNDS] [--bound SECONDS]   # default 2 rounds, bound 300

`--bound` is `[channels.sms].max_retry_after_seconds`, the longest a delivery waits for the
unreachable limiter: 300 (the default) outlasts the outage, 1 does not. Run it with
`PYTHONPATH` on the code to measure (old and new worktrees, alternately). Per round: deliveries
received, received twice, failed for good, reported `outcome unknown`; partition runs started
(20 partitions of 50 users) and the runs of a partition that began while another run of the same
users was going; time from Redis's restart to the job's end and the whole job's time;
CPU-seconds per delivery of this process (dispatchers, outbox) and of the store.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pymongo
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from redis_server import start_redis_server  # noqa: E402

from dispatcher import open_dispatcher  # noqa: E402
from dispatcher.context import RunContext  # noqa: E402
from dispatcher.embedded_store import open_embedded_store  # noqa: E402
from dispatcher.settings import settings_from_dict  # noqa: E402

USERS = 1000
RATE = 100
BATCH = 50
DOWN_SECONDS = 3.2


class PartitionRuns:
    """Runs of a partition's users through the pipeline, and those that began beside a live one."""

    def __init__(self) -> None:
        self.active: Counter[frozenset[str]] = Counter()
        self.started = 0
        self.overlaps = 0
        original = RunContext.run

        async def run(context: RunContext, plan: Any, *args: Any, **kwargs: Any) -> Any:
            users = frozenset(plan.request.recipients)
            self.overlaps += self.active[users] > 0
            self.active[users] += 1
            self.started += 1
            try:
                return await original(context, plan, *args, **kwargs)
            finally:
                self.active[users] -= 1

        RunContext.run = run  # type: ignore[method-assign]


async def one_round(n: int, bound: float, store_url: str, store_process: psutil.Process) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="redis-outage-"))
    redis = await trio.to_thread.run_sync(start_redis_server)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(store_url)
    database = client[f"outage{n}_{time.time_ns()}"]
    database.users.insert_many(
        [{"_id": f"u{i:04d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(USERS)]
    )
    outbox = work / "outbox" / "sms"
    settings = settings_from_dict(
        {
            "store": {"url": store_url, "database": database.name, "lease_seconds": 2},
            "providers": {"outbox": {"dir": str(work / "outbox")}},
            "sender": {"sms": "+15550009999"},
            "channels": {
                "active": ["sms"],
                "sms": {"rate_per_second": RATE, "concurrency": 8, "max_retry_after_seconds": bound},
            },
            "dispatcher": {"store_batch_size": BATCH, "drain_timeout_seconds": 5},
            "cluster": {"redis_url": redis.url, "namespace": f"outage{n}"},
        }
    )
    runs = PartitionRuns()
    cpu = psutil.Process().cpu_times()
    store_cpu = store_process.cpu_times()
    try:
        async with open_dispatcher(settings) as first, open_dispatcher(settings):
            started = time.monotonic()
            job_id = await first.submit({"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"})
            with trio.fail_after(300):
                while not outbox.exists() or len(os.listdir(outbox)) < USERS // 4:
                    await trio.sleep(0.01)
                await trio.to_thread.run_sync(redis.kill)
                await trio.sleep(DOWN_SECONDS)
                await trio.to_thread.run_sync(redis.start)
                back = time.monotonic()
                while database.dispatch_jobs.find_one({"_id": job_id})["state"] not in ("done", "failed"):
                    await trio.sleep(0.05)
            ended = time.monotonic()
        cpu_after, store_after = psutil.Process().cpu_times(), store_process.cpu_times()
        received = Counter(json.loads(p.read_text())["userId"] for p in outbox.glob("*.json"))
        deliveries = list(database.dispatch_deliveries.find({"job": job_id}))
        unknown = sum((d.get("error") or "").startswith("outcome unknown") for d in deliveries)
        failed = sum(d["state"] == "failed" for d in deliveries) - unknown
        return {
            "received": len(received),
            "twice": sum(c > 1 for c in received.values()),
            "failed": failed,
            "unknown": unknown,
            "runs": runs.started,
            "overlapping": runs.overlaps,
            "after_restart_s": ended - back,
            "job_s": ended - started,
            "cpu_ms": 1000 * (cpu_after.user + cpu_after.system - cpu.user - cpu.system) / max(1, len(received)),
            "store_cpu_ms": 1000
            * (store_after.user + store_after.system - store_cpu.user - store_cpu.system)
            / max(1, len(received)),
        }
    finally:
        await trio.to_thread.run_sync(redis.close)
        client.drop_database(database.name)
        client.close()
        shutil.rmtree(work, ignore_errors=True)


async def main() -> None:
    args = sys.argv[1:]
    bound = 300.0
    if "--bound" in args:
        i = args.index("--bound")
        bound = float(args[i + 1])
        del args[i : i + 2]
    rounds = int(args[0]) if args else 2
    original_run = RunContext.run
    print(f"load average {os.getloadavg()}; bound {bound:g}s; code {Path(__import__('dispatcher').__file__).parent}")
    async with open_embedded_store(None) as store_url:
        store = next(p for p in psutil.Process().children(recursive=True) if "nx" in " ".join(p.cmdline()))
        for n in range(rounds):
            RunContext.run = original_run  # type: ignore[method-assign]
            figures = await one_round(n, bound, store_url, store)
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    trio.run(main)
