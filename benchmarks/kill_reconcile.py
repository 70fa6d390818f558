"""SIGKILL of a 3,000-user SMS + e-mail send at 10, 50 and 90 %, restart, and what became of it
(issue 18): SMS left ambiguous are reconciled with the fake Twilio, e-mail (nothing to ask)
reports what was in flight.

    python benchmarks/kill_reconcile.py [USERS] [KILL_AT ...]    # default 3000 at 0.1 0.5 0.9

The run itself is the suite's (`tests/kill_runs.py::kill_and_resume`, which
`tests/test_crash_reconcile.py` runs at 1,000 users to stay short): the real `dispatcher serve`
process on an in-memory embedded store, SMS on the fake Twilio and e-mail on an aiosmtpd sink, 30 ms
per call, concurrency 16 per channel, killed once the given fraction of the SMS reached Twilio.
Counts, not timings: each kill point prints what the ledger held between the kill and the restart,
the SMS reconciliation's found/absent, the unknowns per channel, duplicates and losses (counted at
the fakes' door), and the load average.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pymongo
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dispatcher.embedded_store import EmbeddedServer  # noqa: E402
from kill_runs import kill_and_resume  # noqa: E402

CONCURRENCY = 16
LATENCY = 0.03


async def main(users: int, points: list[float]) -> int:
    server = EmbeddedServer(None)
    client: pymongo.MongoClient = pymongo.MongoClient(server.url)
    failed = 0
    print(
        "| users, kill at | left `sending` (both channels) | SMS found / absent | SMS unknown | e-mail unknown"
        " | duplicates (SMS, e-mail) | lost (SMS, e-mail) | seconds | load average |"
    )
    try:
        for i, kill_at in enumerate(points):
            database = client[f"kill_{i}"]
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="kill-reconcile-") as tmp:
                run = await kill_and_resume(server.url, database, Path(tmp), users, kill_at, CONCURRENCY, LATENCY)
            seconds = time.monotonic() - started
            client.drop_database(database.name)
            reconciled = run.reconciled()
            unknown_sms, unknown_mail = len(run.unknown("sms")), len(run.unknown("email"))
            dup = (run.duplicates("sms"), run.duplicates("email"))
            lost = (len(run.lost("sms")), len(run.lost("email")))
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(
                f"| {users:,}, {kill_at:.0%} | {run.left_sending} | {reconciled['found']} / {reconciled['absent']}"
                f" | {unknown_sms} | {unknown_mail} | {dup[0]}, {dup[1]} | {lost[0]}, {lost[1]} | {seconds:.0f} | {load} |",
                flush=True,
            )
            # The bar: SMS unknown 0, e-mail unknowns within the e-mail concurrency, none
            # twice, none lost.
            failed += bool(unknown_sms or unknown_mail > CONCURRENCY or any(dup) or any(lost))
    finally:
        client.close()
        server.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    points = [float(x) for x in sys.argv[2:]] or [0.1, 0.5, 0.9]
    sys.exit(trio.run(main, users, points))
