"""What Twilio receipts cost a fan-out, and how many one process absorbs, on the embedded store.

    python benchmarks/receipts.py [ROUNDS] [USERS]       # default 3 rounds of 3000 SMS

One service process (the dispatcher and its HTTP app on hypercorn, in this process) with the
embedded store (nx-27017, on disk in a temporary directory) sends SMS through the fake Twilio
(no latency, concurrency 64). A poster in another process (so that its CPU is not the service's)
posts signed status callbacks to `POST /providers/twilio/status` (the SDK's RequestValidator
checks each) for the SIDs of an earlier send: `sent` then `delivered` for each, so half of them
move a delivery and half change nothing.

Each round runs the same fan-out three ways, interleaved: without receipts, with receipts at
10,000 a minute (167/s), and with receipts as fast as 16 posting threads go. It prints the
fan-out's deliveries per second and the receipts per second the service answered, per round and
as medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

SID = "AC" + "0" * 31 + "1"
TOKEN = "benchtoken"


def post(url: str, rate: float, sids_file: str) -> None:
    """The poster (a child process): receipts for every SID, at `rate` per second (0: unpaced),
    until stdin closes; prints how many were answered 204 and over how long."""
    import httpx
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(TOKEN)
    sids = json.loads(Path(sids_file).read_text())
    forms = [
        {"MessageSid": sid, "MessageStatus": status, "AccountSid": SID}
        for status in ("sent", "delivered")
        for sid in sids
    ]
    signed = [(form, validator.compute_signature(url, form)) for form in forms]
    stop = threading.Event()
    done = [0]
    lock = threading.Lock()
    cursor = [0]
    threads = 16
    interval = threads / rate if rate else 0.0

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            next_at = time.monotonic()
            while not stop.is_set():
                with lock:
                    i = cursor[0]
                    cursor[0] += 1
                form, signature = signed[i % len(signed)]
                answer = client.post(url, data=form, headers={"X-Twilio-Signature": signature})
                if answer.status_code == 204:
                    with lock:
                        done[0] += 1
                if interval:
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))

    started = time.monotonic()
    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    sys.stdin.read()  # the parent closes it when the fan-out ended
    stop.set()
    elapsed = time.monotonic() - started
    print(json.dumps({"answered": done[0], "seconds": elapsed}), flush=True)
    sys.exit(0)


async def main(rounds: int, users: int) -> None:
    import pymongo
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from dispatcher import open_dispatcher, settings_from_dict
    from dispatcher.app import create_app
    from dispatcher.embedded_store import EmbeddedServer, free_port
    from dispatcher.fakes import serve_asgi
    from dispatcher.fakes.twilio import FakeTwilio, ReceiptPlan

    data = Path(tempfile.mkdtemp(prefix="receipts-bench-"))
    server = EmbeddedServer(data)
    seed = 2000
    client: pymongo.MongoClient = pymongo.MongoClient(server.url)
    db = client["bench"]
    db.users.insert_many(
        [
            {"_id": f"u{i}", "phoneNumber": f"+1555{i:07d}", "clusters": ["seed" if i < seed else "fan"]}
            for i in range(seed + users)
        ]
    )
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=10**6))  # the poster sends the receipts
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    results: dict[str, list[tuple[float, float]]] = {"none": [], "10k/min": [], "max": []}
    try:
        async with trio.open_nursery() as nursery:
            twilio_url = await nursery.start(serve_asgi, fake)
            settings = settings_from_dict(
                {
                    "store": {"url": server.url, "database": "bench"},
                    "channels": {"active": ["sms"], "sms": {"provider": "twilio", "concurrency": 64}},
                    "sender": {"sms": "+15550009999"},
                    "providers": {
                        "twilio": {
                            "account_sid": SID,
                            "auth_token": TOKEN,
                            "api_base_url": twilio_url,
                            "status_callback_base_url": base,
                        }
                    },
                }
            )
            async with open_dispatcher(settings) as d:
                config = Config()
                config.bind = [f"127.0.0.1:{port}"]
                config.accesslog = None
                config.errorlog = None
                stop = trio.Event()
                await nursery.start(partial(serve, create_app(d), config, shutdown_trigger=stop.wait))
                await d.send({"channels": ["sms"], "clusters": ["seed"], "messageContent": "seed"})
                sids = [doc["provider_id"] for doc in db.dispatch_deliveries.find({"provider_id": {"$ne": None}})]
                sids_file = data / "sids.json"
                sids_file.write_text(json.dumps(sids))
                for r in range(rounds):
                    for mode, rate in (("none", None), ("10k/min", 10_000 / 60), ("max", 0.0)):
                        poster = None
                        if rate is not None:
                            poster = subprocess.Popen(
                                [
                                    sys.executable,
                                    __file__,
                                    "--post",
                                    base + "/providers/twilio/status",
                                    str(rate),
                                    str(sids_file),
                                ],
                                stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                                text=True,
                            )
                            await trio.sleep(1.0)  # the poster is up and posting
                        started = trio.current_time()
                        result = await d.send({"channels": ["sms"], "clusters": ["fan"], "messageContent": f"r{r}"})
                        seconds = trio.current_time() - started
                        absorbed = 0.0
                        if poster is not None:
                            out, _ = await trio.to_thread.run_sync(poster.communicate, "")
                            report = json.loads(out.strip().splitlines()[-1])
                            absorbed = report["answered"] / report["seconds"]
                        rate_out = result.summary.sent.get("sms", 0) / seconds
                        results[mode].append((rate_out, absorbed))
                        print(
                            f"round {r + 1} {mode:8}: fan-out {rate_out:7.0f} SMS/s, receipts answered {absorbed:6.0f}/s"
                        )
                stop.set()
            nursery.cancel_scope.cancel()
    finally:
        client.close()
        server.stop()
    base_rate = statistics.median(x for x, _ in results["none"])
    for mode, rows in results.items():
        fan = statistics.median(x for x, _ in rows)
        absorbed = statistics.median(y for _, y in rows)
        print(f"median {mode:8}: fan-out {fan:7.0f} SMS/s ({fan / base_rate - 1:+.1%}), receipts {absorbed:6.0f}/s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--post":
        post(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    else:
        import trio

        trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 3, int(sys.argv[2]) if len(sys.argv) > 2 else 3000)
