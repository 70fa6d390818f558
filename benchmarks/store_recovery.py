"""How long a send stands still when the embedded store dies: `python benchmarks/store_recovery.py
[--rounds N] [--users N]`.

Each round starts `dispatcher serve` on its embedded store (a data directory of its own), sends
one SMS to every user through a fake Twilio (10 ms per message, 8 at a time), SIGKILLs the
`nx-27017` child once a third has been received, and measures from the kill: until the store
answers again (the service's own log says how long it was down), until messages reach the fake
again (the job resumed), and until the job is done (which mostly measures how fast the rest of
the send goes). It also reports what the kill cost: the
deliveries reported `outcome unknown` and any number received twice (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import trio

from dispatcher.embedded_store import free_port
from dispatcher.fakes.faults import Faults
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio

CLI = [sys.executable, "-c", "from dispatcher.cli import main; raise SystemExit(main())"]


async def one_round(users: int, tmp: Path) -> dict[str, float]:
    fake = FakeTwilio("AC123", "secret", Faults(latency=0.01))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("MONGODB_URL", "REDIS_URL", "DISPATCHER_CONFIG")}
    env |= {"TWILIO_AUTH_TOKEN": "secret", "DISPATCHER__SERVER__PORT": str(port)}
    async with trio.open_nursery() as nursery:
        twilio = await nursery.start(serve_asgi, fake)
        config = tmp / "config.toml"
        config.write_text(f"""
[channels]
active = ["sms"]
[channels.sms]
provider = "twilio"
concurrency = 8
[providers.twilio]
account_sid = "AC123"
api_base_url = "{twilio}"
[sender]
sms = "+15550009999"
[store]
data_dir = "{tmp / "var"}"
""")
        seed = tmp / "seed.json"
        people = [{"_id": f"u{i}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(users)]
        seed.write_text(json.dumps({"users": people, "templates": []}))
        await trio.run_process([*CLI, "--config", str(config), "seed", str(seed)], env=env, capture_stdout=True)
        log = open(tmp / "service.log", "wb")
        service = subprocess.Popen([*CLI, "--config", str(config), "serve"], env=env, stdout=log, stderr=log)
        try:
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                while True:
                    try:
                        if (await client.get("/-/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)
                answer = await client.post(
                    "/send?async=true", json={"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"}
                )
                job_id = answer.json()["id"]
                while len(fake.received) < users // 3:
                    await trio.sleep(0.005)
                [store] = [c for c in psutil.Process(service.pid).children() if "nx_27017" in " ".join(c.cmdline())]
                store.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                # The messages already on their way when the store died still arrive for a moment:
                # the job counts as resumed when messages arrive again after a pause.
                resumed = None
                seen, settled = len(fake.received), None
                while resumed is None:
                    now = time.monotonic()
                    count = len(fake.received)
                    if settled is None and count == seen and now - killed > 0.1:
                        settled = count  # nothing arrived for one poll: the pipeline stopped
                    elif settled is not None and resumed is None and count > settled:
                        resumed = now - killed
                    seen = count
                    await trio.sleep(0.02)
                while (await client.get(f"/send/{job_id}")).json()["status"] != "done":
                    await trio.sleep(0.05)
                done = time.monotonic() - killed
                failures = (await client.get(f"/send/{job_id}/failures?limit=1000")).json()["failures"]
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(30)
            log.close()
            nursery.cancel_scope.cancel()
    [back] = re.findall(
        r"the embedded store is back \(pid \d+, restart 1, down ([0-9.]+)s\)", (tmp / "service.log").read_text()
    )
    twice = sum(1 for n in Counter(r.form["To"] for r in fake.received).values() if n > 1)
    unknown = sum(1 for f in failures if f["error"].startswith("outcome unknown"))
    return {
        "restarted": float(back),
        "resumed": resumed,
        "done": done,
        "unknown": unknown,
        "twice": twice,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--users", type=int, default=3000)
    args = parser.parse_args()
    rows = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="store-recovery-") as tmp:
            row = trio.run(one_round, args.users, Path(tmp))
        rows.append(row)
        print(
            f"round {n + 1}: store restarted {row['restarted']:.2f}s, deliveries resumed {row['resumed']:.2f}s, "
            f"job done {row['done']:.2f}s after the kill; outcome unknown {row['unknown']}, received twice {row['twice']}"
        )
    for key in ("restarted", "resumed", "done"):
        values = [r[key] for r in rows]
        print(f"{key}: median {statistics.median(values):.2f}s (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
