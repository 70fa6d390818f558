"""What Twilio receipts cost a fan-out, and how many one process absorbs, on the embedded store.

    cd benchmarks && python receipts.py [ROUNDS] [USERS] [--second]   # default 3 rounds of 3000 SMS

One service process (the dispatcher and its HTTP app on hypercorn, in this process) with the
embedded store (nx-27017, on disk in a temporary directory) sends SMS through the fake Twilio
(no latency, concurrency 64). A poster in another process (so that its CPU is not the service's)
posts signed status callbacks to `POST /providers/twilio/status` (the SDK's RequestValidator
checks each) for the SIDs of an earlier send, as Twilio does: to the StatusCallback URL each
message was created with (it names the delivery since the receipts change), `sent`, then
`delivered`, message after message; each poster goes on where the previous one stopped (the SIDs wrap around: a seed
send of 8,000 covers the default run), so the `delivered` receipts move deliveries forward.

First the receipts alone, without a fan-out: 8 s at 10,000 a minute (167/s) each of only `sent`,
only `delivered`, and forged ones (403 at the signature: the
HTTP stack's floor), and what each answered receipt cost the service process (it includes the
fake Twilio, idle then) and the store in CPU. Then each round runs the same fan-out three ways, interleaved: without receipts, with
receipts at 10,000 a minute, and with receipts as fast as 16 posting threads go. It prints the
fan-out's deliveries per second, the service's and the store's CPU per delivery (receipts
included), and the receipts per second the service answered, per round and as medians. ROUNDS 0:
the receipts alone only.

`--second`: the receipts go to a second service process instead (the same settings and store,
its own event loop and port, as another worker or a receipts-only instance behind the public
URL would take them; it checks the signature against the same configured URL), so what they cost
the fan-out is what they take from the machine, not from the fan-out's own loop. Every window
also prints the idle cores (from /proc/stat: the machine's, every process included) and the CPU
per receipt of the process that answered them and of the poster, so that one can tell whether
the machine or the code is the bound.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from process_cpu import cpu_seconds

SID = "AC" + "0" * 31 + "1"
TOKEN = "benchtoken"
SEED = 8000
ALONE_SECONDS = 8.0
RATE = 10_000 / 60


def idle_seconds() -> float:
    """Idle (and I/O wait) CPU seconds of the whole machine so far, over every core."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def serve_second(store_url: str, port: int, base: str, twilio_url: str) -> None:
    """The second service process (`--second`): the dispatcher and its HTTP app on `port`, the
    same settings as the first one's, until stdin closes."""
    import trio

    async def run() -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        from dispatcher import open_dispatcher
        from dispatcher.app import create_app

        async with open_dispatcher(settings(store_url, twilio_url, base)) as d, trio.open_nursery() as nursery:
            config = Config()
            config.bind = [f"127.0.0.1:{port}"]
            config.accesslog = None
            config.errorlog = None
            stop = trio.Event()
            await nursery.start(partial(serve, create_app(d), config, shutdown_trigger=stop.wait))
            print("up", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            stop.set()

    trio.run(run)


def settings(store_url: str, twilio_url: str, base: str) -> Any:
    from dispatcher import settings_from_dict

    return settings_from_dict(
        {
            "store": {"url": store_url, "database": "bench"},
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


def post(rate: float, sids_file: str, offset: int, kind: str, target: str) -> None:
    """The poster (a child process): `sent` then `delivered` for each (SID, callback URL) of
    `sids_file` from receipt `offset` on (`kind` "both"), or only one of them ("sent",
    "delivered"), or `delivered` with a wrong signature ("forged": answered 403), at `rate` per
    second (0: unpaced), until stdin closes, to the service at `target` (the base URL: the
    signature is for the callback URL the message was created with, whoever answers it); prints
    how many receipts it used up, how many got the expected answer, and over how long."""
    import httpx
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(TOKEN)
    forger = RequestValidator("not-the-token")
    sids = json.loads(Path(sids_file).read_text())
    forms = [
        (
            url,
            f"{target}/{url.split('/', 3)[3]}" if target else url,
            {"MessageSid": sid, "MessageStatus": status, "AccountSid": SID},
        )
        for sid, url in sids
        for status in ("sent", "delivered")
        if kind == "both" or status == kind or (kind == "forged" and status == "delivered")
    ]
    per_sid = 2 if kind == "both" else 1
    offset //= 2 // per_sid
    expected = 403 if kind == "forged" else 204
    stop = threading.Event()
    done = [0]
    lock = threading.Lock()
    cursor = [offset]
    threads = 16
    interval = threads / rate if rate else 0.0

    def worker() -> None:
        with httpx.Client(timeout=60) as client:
            next_at = time.monotonic()
            while not stop.is_set():
                with lock:
                    i = cursor[0]
                    cursor[0] += 1
                url, posted_to, form = forms[i % len(forms)]
                signature = (forger if kind == "forged" else validator).compute_signature(url, form)
                answer = client.post(posted_to, data=form, headers={"X-Twilio-Signature": signature})
                if answer.status_code == expected:
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
    for thread in pool:
        thread.join()
    used = 0 if kind == "forged" else (cursor[0] - offset) * 2 // per_sid  # forged ones apply nothing
    print(json.dumps({"posted": used, "answered": done[0], "seconds": elapsed}), flush=True)
    sys.exit(0)


class Window:
    """CPU seconds of the processes named, and the machine's idle seconds, over a window."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.idle = idle_seconds()
        self.cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def end(self) -> tuple[float, float, dict[str, float]]:
        """Seconds, idle cores, CPU seconds per process."""
        cpu = {name: cpu_seconds(pid) - self.cpu[name] for name, pid in self.pids.items()}
        seconds = time.monotonic() - self.started
        return seconds, (idle_seconds() - self.idle) / seconds, cpu


async def main(rounds: int, users: int, second: bool) -> None:
    import pymongo
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from dispatcher import open_dispatcher
    from dispatcher.app import create_app
    from dispatcher.embedded_store import EmbeddedServer, free_port
    from dispatcher.fakes import serve_asgi
    from dispatcher.fakes.twilio import FakeTwilio, ReceiptPlan

    data = Path(tempfile.mkdtemp(prefix="receipts-bench-"))
    server = EmbeddedServer(data)
    client: pymongo.MongoClient = pymongo.MongoClient(server.url)
    db = client["bench"]
    db.users.insert_many(
        [
            {"_id": f"u{i}", "phoneNumber": f"+1555{i:07d}", "clusters": ["seed" if i < SEED else "fan"]}
            for i in range(SEED + users)
        ]
    )
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=10**6))  # the poster sends the receipts
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    me = os.getpid()
    # Per mode, per round: SMS/s, receipts answered/s, CPU per SMS of the service and the store,
    # idle cores, CPU per receipt of the process that answered it and of the poster.
    results: dict[str, list[tuple[float, ...]]] = {"none": [], "10k/min": [], "max": []}
    offset = 0
    other: subprocess.Popen[str] | None = None
    target = ""

    def start_poster(rate: float, kind: str = "both", to: str = "") -> subprocess.Popen[str]:
        command = [sys.executable, __file__, "--post", str(rate), str(sids_file), str(offset), kind, to]
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def stop_poster(poster: subprocess.Popen[str]) -> dict[str, float]:
        nonlocal offset
        out, _ = await trio.to_thread.run_sync(poster.communicate, "")
        report = json.loads(out.strip().splitlines()[-1])
        offset += int(report["posted"])
        return report

    try:
        async with trio.open_nursery() as nursery:
            twilio_url = await nursery.start(serve_asgi, fake)
            if second:
                other_port = free_port()
                target = f"http://127.0.0.1:{other_port}"
                command = [sys.executable, __file__, "--serve", server.url, str(other_port), base, twilio_url]
                other = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert other.stdout is not None
                await trio.to_thread.run_sync(other.stdout.readline)  # "up"
            async with open_dispatcher(settings(server.url, twilio_url, base)) as d:
                config = Config()
                config.bind = [f"127.0.0.1:{port}"]
                config.accesslog = None
                config.errorlog = None
                stop = trio.Event()
                await nursery.start(partial(serve, create_app(d), config, shutdown_trigger=stop.wait))
                await d.send({"channels": ["sms"], "clusters": ["seed"], "messageContent": "seed"})
                # Each SID with the callback URL its message was created with, as Twilio keeps it.
                sids = [(r.sid, r.form["StatusCallback"]) for r in fake.received if r.sid]
                sids_file = data / "sids.json"
                sids_file.write_text(json.dumps(sids))

                # The receipts alone, on this process: what each costs the service and the store;
                # `sent` ones touch no store, forged ones stop at the signature.
                for kind in ("sent", "delivered", "forged"):
                    poster = start_poster(RATE, kind)
                    await trio.sleep(1.0)  # the poster is up
                    window = Window({"service": me, "store": server.pid, "poster": poster.pid})
                    await trio.sleep(ALONE_SECONDS)
                    seconds, idle, cpu = window.end()
                    report = await stop_poster(poster)
                    answered = report["answered"] * seconds / report["seconds"]  # about, in the window
                    print(
                        f"receipts alone ({kind:9}) at {RATE:.0f}/s offered: {report['answered'] / report['seconds']:.0f}/s"
                        f" answered; CPU per receipt: service {1e3 * cpu['service'] / answered:.2f} ms,"
                        f" store {1e3 * cpu['store'] / answered:.2f} ms, poster {1e3 * cpu['poster'] / answered:.2f} ms;"
                        f" idle cores {idle:.2f}",
                        flush=True,
                    )

                for r in range(rounds):
                    for mode, rate in (("none", None), ("10k/min", RATE), ("max", 0.0)):
                        poster = None
                        pids = {"service": me, "store": server.pid}
                        if other is not None:
                            pids["second"] = other.pid
                        if rate is not None:
                            poster = start_poster(rate, to=target)
                            pids["poster"] = poster.pid
                            await trio.sleep(1.0)  # the poster is up and posting
                        window = Window(pids)
                        result = await d.send({"channels": ["sms"], "clusters": ["fan"], "messageContent": f"r{r}"})
                        seconds, idle, cpu = window.end()
                        absorbed = 0.0
                        if poster is not None:
                            report = await stop_poster(poster)
                            absorbed = report["answered"] / report["seconds"]
                        sent = result.summary.sent.get("sms", 0)
                        taken = absorbed * seconds
                        row = (
                            sent / seconds,
                            absorbed,
                            1e3 * cpu["service"] / sent,
                            1e3 * cpu["store"] / sent,
                            idle,
                            1e3 * cpu["second"] / taken if taken and other is not None else 0.0,
                            1e3 * cpu.get("poster", 0.0) / taken if taken else 0.0,
                        )
                        results[mode].append(row)
                        print(
                            f"round {r + 1} {mode:8}: fan-out {row[0]:5.0f} SMS/s, CPU per SMS service {row[2]:.2f} ms"
                            f" store {row[3]:.2f} ms; receipts answered {absorbed:4.0f}/s"
                            + (f", CPU per receipt second {row[5]:.2f} ms" if taken and other else "")
                            + (f", CPU per receipt poster {row[6]:.2f} ms" if taken else "")
                            + f"; idle cores {idle:.2f}",
                            flush=True,
                        )
                stop.set()
            nursery.cancel_scope.cancel()
    finally:
        if other is not None:
            other.communicate("")
        client.close()
        server.stop()
    if not rounds:
        return
    base_rate = statistics.median(row[0] for row in results["none"])
    for mode, rows in results.items():
        fan, absorbed, own_ms, store_ms, idle, answering_ms, poster_ms = (
            statistics.median(row[i] for row in rows) for i in range(7)
        )
        print(
            f"median {mode:8}: fan-out {fan:5.0f} SMS/s ({fan / base_rate - 1:+.1%}), CPU per SMS service"
            f" {own_ms:.2f} ms store {store_ms:.2f} ms; receipts {absorbed:4.0f}/s"
            + (f", CPU per receipt second {answering_ms:.2f} ms" if absorbed and second else "")
            + (f", CPU per receipt poster {poster_ms:.2f} ms" if absorbed else "")
            + f"; idle cores {idle:.2f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--post":
        post(float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_second(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        import trio

        args = [a for a in sys.argv[1:] if a != "--second"]
        trio.run(
            main,
            int(args[0]) if args else 3,
            int(args[1]) if len(args) > 1 else 3000,
            "--second" in sys.argv[1:],
        )
