"""The answers about callbacks and dry runs, exactly as the wire carries them: `GET /callbacks`,
`POST /callbacks/{id}/retry`, `POST /send?dryRun=true` and `dispatcher render` (the answers about
jobs are pinned in `test_job_answers.py`). The embedding API answers the same as typed values
(`callback_views.py`, `dryrun.py`), which the HTTP layer and the command line write as JSON
(`wire.py`)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from bson import ObjectId

from dispatcher import Failure, NotFound, RequestError, Skipped, open_dispatcher
from dispatcher.app import create_app
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.files import FakeFilesService
from dispatcher.fakes.webhooks import WebhookReceiver
from dispatcher.listing import encode_cursor
from dispatcher.wire import dry_run_json
from test_cli import clean_env, run_cli

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
CALLBACKS = {"allow_http": True, "allow_private": True, "poll_seconds": 0.05, "secret": SECRET}
CREATED, NEXT_AT = 1796374800.25, 4102444800.5  # the second in 2100: never due while the test runs
TEMPLATE = ObjectId("65a0000000000000000000e1")


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def answer(response: Any) -> Any:
    """The body as sent, its keys in the order they were written."""
    assert response.status_code == 200, await response.get_data()
    return json.loads(await response.get_data())


async def test_callback_listing_and_retry(make_settings: Any, database: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_CALLBACK_SECRET", SECRET)
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001", "clusters": ["all"]})
    receiver = WebhookReceiver(SECRET, script=[400, 400])  # both jobs' job.finished: dead at once
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, receiver)
        async with open_dispatcher(make_settings(callbacks=CALLBACKS)) as d, create_app(d).test_app() as app:
            client = app.test_client()
            request = {"channels": ["sms"], "recipients": ["u1"], "messageContent": "hi"}

            async def send(hook: str, request_id: str) -> str:
                """The id of the job.finished message of a new job."""
                sent = await client.post(
                    "/send", json={**request, "callbackUrl": f"{url}{hook}"}, headers={"X-Request-ID": request_id}
                )
                return f"{(await answer(sent))['id']}.finished"

            first = await send("/hooks/a?token=s3cret#frag", "r-1")
            second = await send("/hooks/b", "r-2")
            with trio.fail_after(15):
                while database.dispatch_callbacks.count_documents({"role": "message", "state": "dead"}) < 2:
                    await trio.sleep(0.05)
            database.dispatch_callbacks.update_many({"role": "message"}, {"$set": {"created": CREATED}})

            def shown(message_id: str, hook: str, request_id: str | None, **fields: Any) -> dict[str, Any]:
                return {
                    "id": message_id,
                    "type": "job.finished",
                    "jobId": message_id.removesuffix(".finished"),
                    "requestId": request_id,
                    "url": f"{url}{hook}",  # no query, no fragment: they may hold a client's token
                    "state": "dead",
                    "events": 1,
                    "attempts": 1,
                    "createdAt": iso(CREATED),
                    "nextAttemptAt": None,
                    "lastError": "HTTP 400: refused by the receiver (only 5xx, 408 and 429 are tried again)",
                    **fields,
                }

            dead_first = shown(first, "/hooks/a", "r-1")
            dead_second = shown(second, "/hooks/b", "r-2")
            # Newest first; `state` defaults to dead.
            assert await answer(await client.get("/callbacks")) == {
                "callbacks": [dead_second, dead_first],
                "next": None,
            }
            seq = database.dispatch_callbacks.find_one({"_id": second})["seq"]
            assert await answer(await client.get("/callbacks?state=dead&limit=1")) == {
                "callbacks": [dead_second],
                "next": encode_cursor(seq),
            }
            assert await answer(await client.get(f"/callbacks?limit=1&cursor={encode_cursor(seq)}")) == {
                "callbacks": [dead_first],
                "next": None,
            }
            assert await answer(await client.get("/callbacks?state=delivered")) == {"callbacks": [], "next": None}

            # A pending message shows when it is tried next.
            database.dispatch_callbacks.update_one(
                {"_id": second}, {"$set": {"state": "pending", "next_at": NEXT_AT, "attempts": 2}}
            )
            assert await answer(await client.get("/callbacks?state=pending")) == {
                "callbacks": [
                    shown(second, "/hooks/b", "r-2", state="pending", attempts=2, nextAttemptAt=iso(NEXT_AT))
                ],
                "next": None,
            }

            # The embedding API: the same answers, typed.
            [dead] = (await d.list_callbacks()).callbacks
            assert (dead.id, dead.job_id, dead.request_id, dead.state, dead.attempts) == (
                first,
                first.removesuffix(".finished"),
                "r-1",
                "dead",
                1,
            )
            assert dead.created_at == dt.datetime.fromtimestamp(CREATED, dt.UTC) and dead.next_attempt_at is None
            pending = await d.list_callbacks("pending", limit=1)
            assert [c.next_attempt_at for c in pending.callbacks] == [dt.datetime.fromtimestamp(NEXT_AT, dt.UTC)]
            assert pending.next is None
            with pytest.raises(RequestError, match="only dead callbacks are retried"):
                await d.retry_callback(second)

            # A retry answers the message as it is now: pending, due at once, with a fresh age and tries.
            before = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            retried = await answer(await client.post(f"/callbacks/{first}/retry"))
            assert before <= retried["createdAt"] == retried["nextAttemptAt"]
            assert retried == {
                **dead_first,
                "state": "pending",
                "attempts": 0,
                "createdAt": retried["createdAt"],
                "nextAttemptAt": retried["createdAt"],
            }
            refused = await client.post(f"/callbacks/{second}/retry")
            assert refused.status_code == 400
            assert json.loads(await refused.get_data()) == {
                "statusCode": 400,
                "error": "Bad Request",
                "message": f"callback {second!r} is pending: only dead callbacks are retried",
            }
            unknown = await client.post("/callbacks/nope/retry")
            assert json.loads(await unknown.get_data()) == {
                "statusCode": 404,
                "error": "Not Found",
                "message": "no callback 'nope'",
            }
        nursery.cancel_scope.cancel()


async def test_callbacks_without_the_ledger_are_a_404(make_settings: Any) -> None:
    async with open_dispatcher(make_settings(store={"ledger": False})) as d, create_app(d).test_app() as app:
        client = app.test_client()
        for response in (await client.get("/callbacks"), await client.post("/callbacks/x/retry")):
            assert json.loads(await response.get_data()) == {
                "statusCode": 404,
                "error": "Not Found",
                "message": "callbacks need the delivery ledger ([store].ledger = true)",
            }
        with pytest.raises(NotFound):
            await d.list_callbacks()


USERS = [
    {
        "_id": "u1",
        "name": "Ada",
        "emailAddress": "ada@example.com",
        "phoneNumber": "+15550000001",
        "deviceToken": "tok-1",
        "clusters": ["c"],
    },
    {"_id": "u2", "name": "Bob", "emailAddress": "bob@example.com", "clusters": ["c"]},  # no phone, no token
    {"_id": "u3", "name": "Cy", "emailAddress": "not an address", "phoneNumber": "+15550000003", "clusters": ["c"]},
    # Beyond the previews: counted by its addresses alone.
    {"_id": "u4", "name": "Di", "phoneNumber": "12", "deviceToken": "tok-4", "clusters": ["c"]},
]
TEMPLATE_DOC = {
    "_id": TEMPLATE,
    "emailTitle": "Hello {{user.name}}",
    "emailMessage": "Your plan is {{data.plan}}.",
    "emailHtmlMessage": "<p>Your plan is <b>{{data.plan}}</b>.</p>",
    "smsMessage": "{{user.name}}: plan {{data.plan}}",
    "voiceMessage": "Hello {{user.name}}",
    "pushTitle": "Plan",
    "pushSubtitle": "for {{user.name}}",
    "pushMessage": "{{data.plan}}",
    "pushData": '{"data": {"plan": "{{data.plan}}", "n": 2}, "android": {"priority": "high"}, "kind": "plan"}',
}
DRY_RUN = {
    "channels": ["email", "sms", "voice", "push"],
    "recipients": ["u1", "u2", "u3", "u4", "ghost"],
    "templateId": str(TEMPLATE),
    "data": {"plan": "gold"},
    "emailCarbonCopies": ["cc@example.com"],
    "emailBlindCarbonCopies": ["bcc@example.com"],
    "emailAttachments": ["notes.txt"],
    "dryRun": True,
}


def email(user_id: str, to: str, name: str) -> dict[str, Any]:
    return {
        "channel": "email",
        "userId": user_id,
        "to": [to],
        "from": "noreply@example.com",
        "subject": f"Hello {name}",
        "text": "Your plan is gold.",
        "html": "<p>Your plan is <b>gold</b>.</p>",
        "cc": ["cc@example.com"],
        "bcc": ["bcc@example.com"],
        "attachments": [{"filename": "notes.txt", "contentType": "text/plain", "bytes": 6}],
    }


DRY_RUN_ANSWER = {
    "dryRun": True,
    # Channel by channel within a batch of users: the previewed users, then the counted ones.
    "previews": [
        email("u1", "ada@example.com", "Ada"),
        email("u2", "bob@example.com", "Bob"),
        {"channel": "sms", "userId": "u1", "to": ["+15550000001"], "from": "+15550009999", "body": "Ada: plan gold"},
        {"channel": "sms", "userId": "u3", "to": ["+15550000003"], "from": "+15550009999", "body": "Cy: plan gold"},
        {"channel": "voice", "userId": "u1", "to": ["+15550000001"], "from": "+15550009998", "body": "Hello Ada"},
        {"channel": "voice", "userId": "u3", "to": ["+15550000003"], "from": "+15550009998", "body": "Hello Cy"},
        {
            "channel": "push",
            "userId": "u1",
            "to": ["tok-1"],
            "title": "Plan",
            "subtitle": "for Ada",
            "body": "gold",
            "data": {"kind": "plan", "plan": "gold", "n": "2"},
            "android": {"priority": "high"},
            "apns": None,
        },
    ],
    "skipped": [
        {"userId": "u4", "channel": "email", "reason": "no address"},
        {"userId": "u2", "channel": "sms", "reason": "no address"},
        {"userId": "u2", "channel": "voice", "reason": "no address"},
        {"userId": "u2", "channel": "push", "reason": "no address"},
        {"userId": "u3", "channel": "push", "reason": "no address"},
    ],
    "failures": [
        # A previewed user's address is checked where the message is built, a counted one's here.
        {"userId": "u3", "channel": "email", "error": "invalid address: 'not an address' is not a valid email address"},
        {"userId": "u4", "channel": "sms", "error": "invalid address: not a valid sms address"},
        {"userId": "u4", "channel": "voice", "error": "invalid address: not a valid voice address"},
        {"userId": "ghost", "channel": "email", "error": "user not found"},
        {"userId": "ghost", "channel": "sms", "error": "user not found"},
        {"userId": "ghost", "channel": "voice", "error": "user not found"},
        {"userId": "ghost", "channel": "push", "error": "user not found"},
    ],
    "summary": {
        "users": 4,
        "selected": {"email": 2, "sms": 2, "voice": 2, "push": 2},
        "skipped": {"email": 1, "sms": 1, "voice": 1, "push": 2},
        "failed": {"email": 2, "sms": 2, "voice": 2, "push": 1},
    },
}


async def test_dry_run_answer(make_settings: Any, database: Any, nursery: trio.Nursery) -> None:
    database.users.insert_many(USERS)
    database.message_templates.insert_one(TEMPLATE_DOC)
    files = await nursery.start(serve_asgi, FakeFilesService({"notes.txt": (b"notes\n", "text/plain")}))
    settings = make_settings(files={"url": files}, dispatcher={"preview_users": 3})
    async with open_dispatcher(settings) as d, create_app(d).test_app() as app:
        response = await app.test_client().post("/send", json=DRY_RUN)
        assert await answer(response) == DRY_RUN_ANSWER
        # The embedding API: the same answer, typed.
        run = await d.dry_run(DRY_RUN)
        assert dry_run_json(run) == DRY_RUN_ANSWER
        assert run.skipped[0] == Skipped("u4", "email", "no address")
        assert run.failures[-1] == Failure("ghost", "push", "user not found")
        assert [(m.channel, m.user_id) for m in run.previews][:3] == [("email", "u1"), ("email", "u2"), ("sms", "u1")]
        assert (run.summary.users, run.summary.skipped["push"]) == (4, 2)


def test_render_command_answer(database: Any, mongo_url: str, tmp_path: Path) -> None:
    """`dispatcher render` prints the dry run's answer for one user, indented, keys in the order
    they were written; no configuration here: the default senders."""
    database.users.insert_many(USERS)
    database.message_templates.insert_one(TEMPLATE_DOC)
    env = clean_env(MONGODB_URL=mongo_url, DISPATCHER__STORE__DATABASE=database.name)
    result = run_cli(
        "render", "--template", str(TEMPLATE), "--user", "u1", "--data", '{"plan": "gold"}', cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    previews = [
        {
            **email("u1", "ada@example.com", "Ada"),
            "from": "no-reply@localhost",
            "cc": [],
            "bcc": [],
            "attachments": [],
        },
        {"channel": "sms", "userId": "u1", "to": ["+15550000001"], "from": "", "body": "Ada: plan gold"},
        DRY_RUN_ANSWER["previews"][-1],
        {"channel": "voice", "userId": "u1", "to": ["+15550000001"], "from": "", "body": "Hello Ada"},
    ]
    expected = {
        "dryRun": True,
        "previews": previews,
        "skipped": [],
        "failures": [],
        "summary": {"users": 1, "selected": {"email": 1, "sms": 1, "push": 1, "voice": 1}, "skipped": {}, "failed": {}},
    }
    assert result.stdout == json.dumps(expected, indent=2, ensure_ascii=False) + "\n"
