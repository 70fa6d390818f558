"""Twilio receipts end to end: the service on a real hypercorn server, the fake Twilio posting
signed status callbacks to it, the SDK's RequestValidator checking them, the ledger in nx-27017."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from twilio.request_validator import RequestValidator

from dispatcher import Dispatcher, Settings, open_dispatcher
from dispatcher.app import create_app
from dispatcher.embedded_store import free_port
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio, ReceiptPlan
from dispatcher.receipts import ReceiptKeeper, twilio_receipt
from dispatcher.states import Receipt

SID = "AC" + "0" * 31 + "1"
TOKEN = "tok"
PATH = "/providers/twilio/status"


@asynccontextmanager
async def service(
    make_settings: Callable[..., Settings], fake: FakeTwilio, **twilio: Any
) -> AsyncIterator[tuple[Dispatcher, str]]:
    """The service on a real port, with receipts pointed at it; yields the dispatcher and its URL."""
    async with trio.open_nursery() as nursery:
        twilio_url = await nursery.start(serve_asgi, fake)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        settings = make_settings(
            channels={"active": ["sms", "voice"], "sms": {"provider": "twilio"}, "voice": {"provider": "twilio"}},
            providers={
                "twilio": {
                    "account_sid": SID,
                    "auth_token": TOKEN,
                    "api_base_url": twilio_url,
                    "status_callback_base_url": base,
                    **twilio,
                }
            },
        )
        async with open_dispatcher(settings) as d:
            config = Config()
            config.bind = [f"127.0.0.1:{port}"]
            config.accesslog = None
            config.graceful_timeout = 1
            stop = trio.Event()
            async with trio.open_nursery() as inner:
                await inner.start(partial(hypercorn_serve, create_app(d), config, shutdown_trigger=stop.wait))
                try:
                    yield d, base
                finally:
                    stop.set()
        nursery.cancel_scope.cancel()


def callback_url(base: str, delivery: str | None = None) -> str:
    """Where Twilio posts: naming the delivery, as the service asks since it can, or not (the
    callback URL of a message created by an older version)."""
    return base + PATH + (f"?{urlencode({'d': delivery})}" if delivery else "")


def signed(base: str, form: dict[str, str], token: str = TOKEN, delivery: str | None = None) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(callback_url(base, delivery), form)}


async def post_receipt(
    base: str, form: dict[str, str], headers: dict[str, str] | None = None, delivery: str | None = None
) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        url = callback_url(base, delivery)
        return await client.post(url, data=form, headers=headers or signed(base, form, delivery=delivery))


async def wait_for(predicate: Callable[[], bool], seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.02)


def users(database: Any, n: int) -> None:
    database.users.insert_many([{"_id": f"u{i}", "phoneNumber": f"+1555123{i:04d}"} for i in range(n)])


async def test_signed_receipts_move_deliveries_forward(make_settings, database) -> None:
    users(database, 6)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=0.05, mix={"undelivered": 0.5}, seed=7))
    async with service(make_settings, fake) as (d, base):
        job = await d.submit(
            {
                "channels": ["sms", "voice"],
                "clusters": [],
                "recipients": [f"u{i}" for i in range(6)],
                "messageContent": "hello",
            }
        )
        # Every message gets "sent" then a final status; every call one final status.
        await wait_for(lambda: len(fake.callbacks) == 6 * 2 + 6)
        assert all(status == 204 for _, status in fake.callbacks)
        # Receipts that beat their outcome's write are kept and applied by the next sweep.
        await wait_for(
            lambda: database.dispatch_deliveries.count_documents({"state": {"$in": ["sending", "sent"]}}) == 0
        )
        status = await d.status(job)
        failures = (await d.failures(job)).failures
        deliveries = list(database.dispatch_deliveries.find({"job": job}))
    final = {form.get("MessageSid") or form["CallSid"]: form for form, _ in fake.callbacks}
    for doc in deliveries:
        form = final[doc["provider_id"]]
        word = form.get("MessageStatus") or form["CallStatus"]
        expected = "delivered" if word in ("delivered", "completed") else "undelivered"
        assert doc["state"] == expected, (doc, form)
        if expected == "undelivered":
            assert doc["error"].startswith("undelivered (")
    delivered = sum(1 for doc in deliveries if doc["state"] == "delivered")
    undelivered = len(deliveries) - delivered
    assert status.summary.sent == {"sms": 6, "voice": 6}  # accepted, whatever the receipts said
    assert status.receipts is not None
    assert sum(status.receipts.delivered.values()) == delivered
    assert sum(status.receipts.undelivered.values()) == undelivered > 0
    assert len(failures) == undelivered
    assert any("Twilio 30003: Unreachable destination handset" in f.error for f in failures)


async def test_forged_or_missing_signature_is_refused_and_changes_nothing(make_settings, database) -> None:
    users(database, 1)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=3600))  # no real callback in time
    async with service(make_settings, fake) as (d, base):
        result = await d.send({"channels": ["sms"], "recipients": ["u0"], "messageContent": "x"})
        assert result.summary.sent == {"sms": 1}
        [doc] = database.dispatch_deliveries.find({})
        form = {"MessageSid": doc["provider_id"], "MessageStatus": "delivered", "AccountSid": SID}
        missing = await post_receipt(base, form, headers={"X-Nothing": "1"})
        forged = await post_receipt(base, form, headers=signed(base, form, token="not-the-token"))
        tampered = await post_receipt(base, {**form, "MessageStatus": "undelivered"}, headers=signed(base, form))
        for answer in (missing, forged, tampered):
            assert answer.status_code == 403
            body = answer.json()
            assert (
                body["statusCode"] == 403 and body["error"] == "Forbidden" and "X-Twilio-Signature" in body["message"]
            )
        assert database.dispatch_deliveries.find_one({})["state"] == "sent"
        assert (await post_receipt(base, form)).status_code == 204
        assert database.dispatch_deliveries.find_one({})["state"] == "delivered"


@pytest.mark.parametrize("named", [True, False], ids=["naming-the-delivery", "sid-only"])
async def test_out_of_order_and_duplicate_receipts_only_move_forward(make_settings, database, named) -> None:
    users(database, 1)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=3600))
    async with service(make_settings, fake) as (d, base):
        await d.send({"channels": ["sms"], "recipients": ["u0"], "messageContent": "x"})
        doc = database.dispatch_deliveries.find_one({})
        sid, delivery = doc["provider_id"], doc["_id"] if named else None
        # The message was created with a callback URL naming its delivery.
        assert fake.received[0].form["StatusCallback"] == callback_url(base, doc["_id"])

        def receipt(status: str, **extra: str) -> dict[str, str]:
            return {"MessageSid": sid, "MessageStatus": status, "AccountSid": SID, **extra}

        for form in (
            receipt("delivered"),
            receipt("sent"),
            receipt("delivered"),
            receipt("queued"),
            receipt("undelivered", ErrorCode="30003"),
        ):
            assert (await post_receipt(base, form, delivery=delivery)).status_code == 204
        doc = database.dispatch_deliveries.find_one({})
        assert doc["state"] == "delivered" and "error" not in doc
        assert [r["status"] for r in doc["receipts"].values()] == ["delivered"]  # the rest changed nothing
        # and were told from receipts for a delivery not recorded yet: none was kept for later.
        assert database.dispatch_deliveries_receipts.count_documents({}) == 0
        [view] = (await d.deliveries(doc["job"], "u0")).deliveries
        assert view.state == "delivered" and view.provider_id == sid and view.attempts == 1
        assert view.receipts[0].status == "delivered" and view.claimed_at and view.settled_at


async def test_concurrent_receipts_for_one_delivery_end_at_the_furthest_state(make_settings, database) -> None:
    users(database, 1)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=3600))
    async with service(make_settings, fake) as (d, base):
        await d.send({"channels": ["sms"], "recipients": ["u0"], "messageContent": "x"})
        sid = database.dispatch_deliveries.find_one({})["provider_id"]
        forms = [{"MessageSid": sid, "MessageStatus": s, "AccountSid": SID} for s in ("sent", "delivered", "sent") * 5]
        async with trio.open_nursery() as nursery:
            for form in forms:
                nursery.start_soon(post_receipt, base, form)
        doc = database.dispatch_deliveries.find_one({})
        assert doc["state"] == "delivered" and len(doc["receipts"]) == 1


async def test_receipt_before_the_outcome_is_kept_then_applied(make_settings, database) -> None:
    """The receipt lands while the delivery is still `sending` (its outcome not written yet)."""
    users(database, 1)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=3600))
    async with service(make_settings, fake) as (d, base):
        assert d.receipts is not None
        await d.send({"channels": ["sms"], "recipients": ["u0"], "messageContent": "x"})
        doc = database.dispatch_deliveries.find_one({})
        sid = doc["provider_id"]
        # Put the delivery back where it was before its outcome's write.
        database.dispatch_deliveries.update_one(
            {"_id": doc["_id"]}, {"$set": {"state": "sending"}, "$unset": {"provider_id": ""}}
        )
        form = {"MessageSid": sid, "MessageStatus": "delivered", "AccountSid": SID}
        assert (await post_receipt(base, form)).status_code == 204
        assert database.dispatch_deliveries.find_one({})["state"] == "sending"
        assert database.dispatch_deliveries_receipts.count_documents({}) == 1
        # The outcome is written now; the next sweep applies the kept receipt.
        database.dispatch_deliveries.update_one({"_id": doc["_id"]}, {"$set": {"state": "sent", "provider_id": sid}})
        outcome = await d.receipts.apply_kept()
        assert outcome.applied == 1
        assert database.dispatch_deliveries.find_one({})["state"] == "delivered"
        assert database.dispatch_deliveries_receipts.count_documents({}) == 0


async def test_one_group_of_receipts_naming_their_deliveries(make_settings, database) -> None:
    """One bulk for the group: applied, duplicates and receipts behind the delivery unchanged,
    a receipt for a delivery whose outcome is not written yet (or that does not exist) kept."""
    users(database, 3)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=3600))
    async with service(make_settings, fake) as (d, _):
        assert d.ledger is not None
        job = await d.submit({"channels": ["sms"], "recipients": ["u0", "u1", "u2"], "messageContent": "x"})
        await wait_for(lambda: database.dispatch_jobs.find_one({"_id": job})["state"] == "done")
        docs = {doc["user"]: doc for doc in database.dispatch_deliveries.find({})}
        # u2's outcome is not written yet.
        database.dispatch_deliveries.update_one(
            {"_id": docs["u2"]["_id"]}, {"$set": {"state": "sending"}, "$unset": {"provider_id": ""}}
        )

        def receipt(user: str, state: str, at: float, delivery: str | None = None) -> Receipt:
            doc = docs[user]
            return Receipt(doc["provider_id"], state, state, at, delivery=delivery or doc["_id"])  # type: ignore[arg-type]

        all_applied = await d.ledger.apply_receipts([receipt("u0", "delivered", 1.0)])
        assert (all_applied.applied, all_applied.unchanged, all_applied.kept) == (1, 0, 0)
        group = [
            receipt("u0", "delivered", 2.0),  # behind: u0 is delivered already
            receipt("u1", "undelivered", 3.0),
            receipt("u1", "undelivered", 4.0),  # the same status again
            receipt("u1", "delivered", 5.0),  # after a final state
            receipt("u2", "delivered", 6.0),  # not written yet: kept
            receipt("u1", "delivered", 7.0, delivery=f"{job}|sms|nobody"),  # no such delivery: kept
        ]
        outcome = await d.ledger.apply_receipts(group)
        assert (outcome.applied, outcome.unchanged, outcome.kept) == (1, 3, 2)
        states = {doc["user"]: doc for doc in database.dispatch_deliveries.find({})}
        assert states["u0"]["receipts"]["delivered"]["at"] == 1.0
        assert states["u1"]["state"] == "undelivered" and states["u1"]["receipts"]["undelivered"]["at"] == 3.0
        assert "delivered" not in states["u1"]["receipts"]
        assert states["u2"]["state"] == "sending"
        assert database.dispatch_deliveries_receipts.count_documents({}) == 2
        # u2's outcome is written: the sweep applies its kept receipt, by its delivery id.
        database.dispatch_deliveries.update_one(
            {"_id": docs["u2"]["_id"]}, {"$set": {"state": "sent", "provider_id": docs["u2"]["provider_id"]}}
        )
        assert d.receipts is not None
        assert (await d.receipts.apply_kept()).applied == 1
        assert database.dispatch_deliveries.find_one({"_id": docs["u2"]["_id"]})["state"] == "delivered"
        receipts = (await d.status(job)).receipts
        assert receipts is not None and receipts.delivered == {"sms": 2} and receipts.undelivered == {"sms": 1}


async def test_receipts_taken_one_after_another_share_one_write(make_settings, database) -> None:
    """Receipts taken at different moments (Twilio posts each on its own) wait for each other
    and are written in one round trip, not one each."""
    users(database, 4)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=3600))
    async with service(make_settings, fake) as (d, _):
        assert d.ledger is not None and d.receipts is not None
        job = await d.submit({"channels": ["sms"], "recipients": [f"u{i}" for i in range(4)], "messageContent": "x"})
        await wait_for(lambda: database.dispatch_jobs.find_one({"_id": job})["state"] == "done")
        docs = list(database.dispatch_deliveries.find({}))
        groups: list[int] = []
        write = d.ledger._write_receipts

        def counted(calls: Any, stamp: Any = None) -> None:
            groups.append(len(calls))
            write(calls, stamp)

        d.ledger._write_receipts = counted  # type: ignore[method-assign]

        async def take(i: int) -> None:
            for _ in range(i * 3):  # later than the one before, in ticks of its own
                await trio.lowlevel.checkpoint()
            doc = docs[i]
            await d.receipts.take([Receipt(doc["provider_id"], "delivered", "delivered", 1.0, delivery=doc["_id"])])

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(take, i)
    assert groups == [4]
    assert database.dispatch_deliveries.count_documents({"state": "delivered"}) == 4


async def test_kept_receipt_without_delivery_is_dropped_after_its_time(make_settings, database, caplog) -> None:
    fake = FakeTwilio(SID, TOKEN)
    async with service(make_settings, fake, orphan_receipt_minutes=1) as (d, base):
        assert d.receipts is not None
        form = {"MessageSid": "SMnobody", "MessageStatus": "delivered", "AccountSid": SID}
        assert (await post_receipt(base, form)).status_code == 204
        now = [time.time()]
        keeper = ReceiptKeeper(d.ledger, d.settings, clock=lambda: now[0])  # type: ignore[arg-type]
        await keeper.apply_kept()
        assert database.dispatch_deliveries_receipts.count_documents({}) == 1  # not old enough
        now[0] += 61
        await keeper.apply_kept()
        assert database.dispatch_deliveries_receipts.count_documents({}) == 0
    assert sum("dropped Twilio receipt delivered for SMnobody" in r.getMessage() for r in caplog.records) == 1


async def test_no_receipt_within_the_timeout_marks_unconfirmed(make_settings, database) -> None:
    users(database, 3)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=3600))
    async with service(make_settings, fake) as (d, base):
        job = await d.submit({"channels": ["sms"], "recipients": ["u0", "u1", "u2"], "messageContent": "x"})
        await wait_for(lambda: database.dispatch_jobs.find_one({"_id": job})["state"] == "done")
        docs = list(database.dispatch_deliveries.find({}))
        first = docs[0]["provider_id"]
        assert (await post_receipt(base, {"MessageSid": first, "MessageStatus": "delivered"})).status_code == 204
        now = [time.time()]
        keeper = ReceiptKeeper(d.ledger, d.settings, clock=lambda: now[0])  # type: ignore[arg-type]
        assert await keeper.time_out() == 0  # 72 hours have not passed
        now[0] += 72 * 3600 + 1
        assert await keeper.time_out() == 2
        receipts = (await d.status(job)).receipts
        assert receipts is not None and receipts.unconfirmed == {"sms": 2} and receipts.delivered == {"sms": 1}
        # A late receipt still moves an unconfirmed delivery on.
        late = docs[1]["provider_id"]
        assert (await post_receipt(base, {"MessageSid": late, "MessageStatus": "delivered"})).status_code == 204
        receipts = (await d.status(job)).receipts
        assert receipts is not None and receipts.unconfirmed == {"sms": 1} and receipts.delivered == {"sms": 2}


def test_twilio_statuses_map_to_states() -> None:
    def state(**form: str) -> tuple[str, bool] | None:
        receipt = twilio_receipt(form, now=0)
        return None if receipt is None else (receipt.state, receipt.permanent)

    assert state(MessageSid="SM1", MessageStatus="read") == ("delivered", False)
    assert state(MessageSid="SM1", MessageStatus="sending") == ("sent", False)
    assert state(MessageSid="SM1", MessageStatus="undelivered", ErrorCode="30003") == ("undelivered", False)
    assert state(MessageSid="SM1", MessageStatus="undelivered", ErrorCode="30005") == ("undelivered", True)
    assert state(MessageSid="SM1", MessageStatus="failed", ErrorCode="30001") == ("undelivered", True)
    assert state(MessageSid="SM1", MessageStatus="received") is None
    assert state(CallSid="CA1", CallStatus="completed") == ("delivered", False)
    assert state(CallSid="CA1", CallStatus="busy") == ("undelivered", False)
    assert state(CallSid="CA1", CallStatus="no-answer") == ("undelivered", False)
    assert state(CallSid="CA1", CallStatus="failed") == ("undelivered", True)
    assert state(CallSid="CA1", CallStatus="canceled") == ("undelivered", True)


@pytest.mark.parametrize("form", [{}, {"MessageStatus": "delivered"}])
async def test_signed_callback_naming_nothing_is_a_400(make_settings, database, form) -> None:
    async with service(make_settings, FakeTwilio(SID, TOKEN)) as (d, base):
        answer = await post_receipt(base, form)
    assert answer.status_code == 400 and answer.json()["statusCode"] == 400


async def test_forms_answered_outside_quart_get_the_same_answers_as_through_it(make_settings, database, caplog) -> None:
    """A urlencoded form (what Twilio posts) is answered before Quart (twilio_status.py); a
    multipart one still by Quart's route: the same statuses, error shape, request id and log."""
    users(database, 1)
    fake = FakeTwilio(SID, TOKEN, receipts=ReceiptPlan(delay=3600))
    caplog.set_level("INFO", logger="dispatcher.access")
    async with service(make_settings, fake) as (d, base):
        await d.send({"channels": ["sms"], "recipients": ["u0"], "messageContent": "x"})
        [doc] = database.dispatch_deliveries.find({})
        sent = {"MessageSid": doc["provider_id"], "MessageStatus": "sent", "AccountSid": SID}
        answers: dict[str, list[tuple[int, Any, str | None]]] = {}
        async with httpx.AsyncClient() as client:
            for encoding in ("urlencoded", "multipart"):
                answers[encoding] = []
                for form, headers in (
                    (sent, signed(base, sent, token="not-the-token")),
                    ({"MessageStatus": "sent"}, signed(base, {"MessageStatus": "sent"})),
                    (sent, signed(base, sent)),
                ):
                    headers = {**headers, "X-Request-ID": f"{encoding}-{len(answers[encoding])}"}
                    if encoding == "urlencoded":
                        answer = await client.post(callback_url(base), data=form, headers=headers)
                    else:
                        answer = await client.post(callback_url(base), data=form, files={"f": b""}, headers=headers)
                    body = answer.json() if answer.content else None
                    answers[encoding].append((answer.status_code, body, answer.headers.get("X-Request-ID")))
    expected_bodies = [
        {"statusCode": 403, "error": "Forbidden", "message": "X-Twilio-Signature is missing or does not match"},
        {
            "statusCode": 400,
            "error": "Bad Request",
            "message": "not a Twilio status callback: neither MessageSid nor CallSid",
        },
        None,
    ]
    for encoding, got in answers.items():
        assert [status for status, _, _ in got] == [403, 400, 204], encoding
        assert [body for _, body, _ in got] == expected_bodies, encoding
        assert [rid for _, _, rid in got] == [f"{encoding}-{i}" for i in range(3)], encoding
    lines = [r.getMessage() for r in caplog.records if r.name == "dispatcher.access" and PATH in r.getMessage()]
    assert [line.split()[2] for line in lines] == ["403", "400", "204"] * 2
