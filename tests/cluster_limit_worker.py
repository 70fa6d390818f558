"""One process of the cluster-wide rate-limit test: connects, prints `ready`, reads
`START_AT STOP_AT` (wall-clock seconds) from stdin, then takes tokens from a `ClusterBucket` with a
few tasks until STOP_AT and writes the wall-clock time of each token to a JSON file.

    python tests/cluster_limit_worker.py URL NAMESPACE RATE BURST TASKS OUT
"""

from __future__ import annotations

import json
import sys
import time

import trio
from pydantic import SecretStr

from dispatcher.cluster import open_cluster
from dispatcher.settings import ClusterSettings


async def main(url: str, namespace: str, rate: float, burst: int, tasks: int, out: str) -> None:
    times: list[float] = []
    async with open_cluster(ClusterSettings(redis_url=SecretStr(url), namespace=namespace)) as cluster:
        bucket = cluster.bucket("sms", rate, burst)
        print("ready", flush=True)
        start_at, stop_at = map(float, (await trio.to_thread.run_sync(sys.stdin.readline)).split())

        async def take() -> None:
            while time.time() < stop_at:
                await bucket.acquire()
                times.append(time.time())  # no checkpoint in between: the instant it was handed out

        await trio.sleep(max(0.0, start_at - time.time()))
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(take)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(
            {
                "times": times,
                "round_trips": bucket.stats.round_trips,
                "tokens": bucket.stats.tokens,
                "lost": bucket.stats.lost,
            },
            f,
        )


if __name__ == "__main__":
    url, namespace, rate, burst, tasks, out = sys.argv[1:]
    trio.run(main, url, namespace, float(rate), int(burst), int(tasks), out)
