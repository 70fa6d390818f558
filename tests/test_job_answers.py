"""Every answer about a job, exactly as the wire carries it: `GET /send/{id}`, `DELETE /send/{id}`,
`GET /send`, `/failures` and `/deliveries`, and the `job.finished` callback, whose data is the body
of `GET /send/{id}`. The embedding API answers the same as typed values (`job_views.py`), which
the HTTP layer writes as JSON (`wire.py`)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
import trio

from dispatcher import open_dispatcher
from dispatcher.app import create_app
from dispatcher.listing import JobQuery

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
REQUEST = {"channels": ["sms"], "clusters": ["all"], "recipients": ["ghost"], "messageContent": "hi"}
CREATED, STARTED, FINISHED = "2026-12-04T09:00:00.000Z", "2026-12-04T09:00:00.010Z", "2026-12-04T09:00:01.500Z"
CLAIMED, SETTLED, RECEIPT = 1796374800.25, 1796374801.5, 1796374860.125
JOB_KEYS = ["id", "status", "createdAt", "startedAt", "finishedAt", "summary", "error", "requestId", "channels"]
SUMMARY_KEYS = ["users", "sent", "skipped", "failed", "delivered", "undelivered", "unconfirmed"]


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def answer(response: Any) -> Any:
    """The body as sent, its keys in the order they were written."""
    assert response.status_code == 200, await response.get_data()
    return json.loads(await response.get_data())


@pytest.fixture
def settings(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DISPATCHER_CALLBACK_SECRET", SECRET)
    return make_settings(callbacks={"allow_http": True, "allow_private": True, "secret": SECRET})


async def test_every_job_answer_and_the_finished_callback(settings: Any, database: Any) -> None:
    database.users.insert_many(
        [
            {"_id": "u1", "phoneNumber": "+15550000001", "clusters": ["all"]},
            {"_id": "u2", "clusters": ["all"]},  # no phone number: skipped
        ]
    )
    async with open_dispatcher(settings) as d, create_app(d).test_app() as app:
        client = app.test_client()
        sent = await answer(
            await client.post(
                "/send", json={**REQUEST, "callbackUrl": "http://127.0.0.1:9/hooks"}, headers={"X-Request-ID": "r-9"}
            )
        )
        job_id = sent["id"]
        status = await answer(await client.get(f"/send/{job_id}"))
        with trio.fail_after(10):
            while (message := database.dispatch_callbacks.find_one({"_id": f"{job_id}.finished"})) is None:
                await trio.sleep(0.02)
        # The callback carries the status as `GET /send/{id}` answered it, keys in the same order.
        data = json.loads(message["body"])["data"]
        assert data == status and list(data) == JOB_KEYS
        assert list(data["summary"]) == SUMMARY_KEYS

        # Fixed times, and a receipt that took u1's SMS to `undelivered`.
        database.dispatch_jobs.update_one(
            {"_id": job_id}, {"$set": {"created_at": CREATED, "started_at": STARTED, "finished_at": FINISHED}}
        )
        database.dispatch_deliveries.update_one(
            {"job": job_id, "user": "u1"},
            {
                "$set": {
                    "state": "undelivered",
                    "provider_id": "SM1",
                    "error": "Twilio 30003: Unreachable destination handset",
                    "failure": "permanent",
                    "reconciled": "found",
                    "claimed_at": CLAIMED,
                    "settled_at": SETTLED,
                    "receipt_at": RECEIPT,
                    "receipts": {
                        "SM1|undelivered": {
                            "status": "undelivered",
                            "state": "undelivered",
                            "code": "30003",
                            "at": RECEIPT,
                        },
                        "SM1|sent": {"status": "sent", "state": "sent", "code": None, "at": SETTLED},
                    },
                }
            },
        )
        summary = {
            "users": 2,
            "sent": {"sms": 1},
            "skipped": {"sms": 1},
            "failed": {"sms": 1},
            "delivered": {},
            "undelivered": {"sms": 1},
            "unconfirmed": {},
        }
        job = {
            "id": job_id,
            "status": "done",
            "createdAt": CREATED,
            "startedAt": STARTED,
            "finishedAt": FINISHED,
            "summary": summary,
            "error": None,
            "requestId": "r-9",
            "channels": ["sms"],
        }
        assert await answer(await client.get(f"/send/{job_id}")) == job
        # Cancelling a job that has ended changes nothing and answers its status.
        assert await answer(await client.delete(f"/send/{job_id}")) == job

        # The listing shows the counts as the job stored them; receipts are counted by GET /send/{id}.
        stored = {key: summary[key] for key in ("users", "sent", "skipped", "failed")}
        assert await answer(await client.get("/send")) == {"jobs": [{**job, "summary": stored}], "next": None}

        assert await answer(await client.get(f"/send/{job_id}/failures?limit=1")) == {
            "id": job_id,
            "failures": [{"userId": "ghost", "channel": "sms", "error": "user not found"}],
            "next": f"{job_id}|sms|ghost",
        }
        assert await answer(await client.get(f"/send/{job_id}/failures?after={job_id}|sms|ghost")) == {
            "id": job_id,
            "failures": [{"userId": "u1", "channel": "sms", "error": "Twilio 30003: Unreachable destination handset"}],
            "next": None,
        }

        assert await answer(await client.get(f"/send/{job_id}/deliveries?userId=u1")) == {
            "id": job_id,
            "userId": "u1",
            "deliveries": [
                {
                    "channel": "sms",
                    "state": "undelivered",
                    "attempts": 1,
                    "providerId": "SM1",
                    "error": "Twilio 30003: Unreachable destination handset",
                    "claimedAt": iso(CLAIMED),
                    "settledAt": iso(SETTLED),
                    "receiptAt": iso(RECEIPT),
                    "receipts": [
                        {"status": "sent", "state": "sent", "code": None, "at": iso(SETTLED)},
                        {"status": "undelivered", "state": "undelivered", "code": "30003", "at": iso(RECEIPT)},
                    ],
                    "failure": "permanent",
                    "reconciled": "found",
                }
            ],
        }
        # The embedding API: the same answers, typed.
        status = await d.status(job_id)
        assert (status.state, status.created_at, status.request_id, status.channels) == (
            "done",
            CREATED,
            "r-9",
            ("sms",),
        )
        assert status.summary.users == 2 and status.summary.failed == {"sms": 1}
        assert status.receipts is not None and status.receipts.undelivered == {"sms": 1}
        page = await d.failures(job_id, limit=1)
        assert [(f.user_id, f.error) for f in page.failures] == [("ghost", "user not found")]
        assert page.next == f"{job_id}|sms|ghost"
        [record] = (await d.deliveries(job_id, "u1")).deliveries
        assert record.claimed_at == dt.datetime.fromtimestamp(CLAIMED, dt.UTC) and record.failure == "permanent"
        assert [(r.status, r.code) for r in record.receipts] == [("sent", None), ("undelivered", "30003")]
        listing = await d.jobs(JobQuery())
        assert [job.id for job in listing.jobs] == [job_id] and listing.jobs[0].receipts is None
        assert listing.next is None

        skipped = await answer(await client.get(f"/send/{job_id}/deliveries?userId=u2"))
        assert skipped["deliveries"] == [
            {
                "channel": "sms",
                "state": "skipped",
                "attempts": 0,
                "providerId": None,
                "error": skipped["deliveries"][0]["error"],
                "claimedAt": None,
                "settledAt": skipped["deliveries"][0]["settledAt"],
                "receiptAt": None,
                "receipts": [],
            }
        ]
