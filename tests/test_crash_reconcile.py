"""SIGKILL the service in the middle of an SMS + e-mail fan-out, start it again, and count what the
fakes received: the SMS left ambiguous by the kill are reconciled with (the fake) Twilio, so none
is reported `outcome unknown`, none is sent twice and none is lost; e-mail (nothing to ask) keeps
reporting the few that were in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.collector import FLUSH_SECONDS
from kill_runs import kill_and_resume

USERS = 1000
SMS_CONCURRENCY = 16
EMAIL_CONCURRENCY = 16
LATENCY = 0.03


# 1,000 users keep the suite quick (each run restarts the service); the 3,000 at 10, 50 and
# 90 % run in `python benchmarks/kill_reconcile.py` (figures in docs/benchmarks.md, section T).
@pytest.mark.parametrize(("kill_at", "users"), [(0.1, USERS), (0.9, USERS)])
async def test_sigkill_then_restart_reconciles_every_sms(
    kill_at: float, users: int, mongo_url: str, database: Any, tmp_path: Path
) -> None:
    run = await kill_and_resume(mongo_url, database, tmp_path, users, kill_at, SMS_CONCURRENCY, LATENCY)
    sms, email = run.deliveries["sms"], run.deliveries["email"]

    # SMS: every user received it exactly once, and every delivery says so (with Twilio's SID).
    assert len(sms) == users
    assert run.unknown("sms") == set()
    assert run.duplicates("sms") == 0, "an SMS was sent twice"
    assert set(run.received["sms"]) == set(sms) and not run.lost("sms"), "an SMS was lost"
    assert all(d["state"] == "sent" and run.sid_of[d["provider_id"]] == u for u, d in sms.items())
    # E-mail: nothing twice; what is not sent is unknown (in flight at the kill), nothing silently lost.
    assert len(email) == users
    assert run.duplicates("email") == 0, "an e-mail was sent twice"
    assert not run.lost("email")
    assert len(run.unknown("email")) <= EMAIL_CONCURRENCY + EMAIL_CONCURRENCY / LATENCY * FLUSH_SECONDS
    reconciled = run.reconciled()
    print(
        f"kill at {kill_at:.0%}: left sending {run.left_sending}; sms reconciled found {reconciled['found']}, "
        f"absent {reconciled['absent']}, unknown 0; e-mail unknown {len(run.unknown('email'))}"
    )
