"""E-mail attachments end to end: dispatcher -> FilesClient -> a real fake Files Service on
127.0.0.1 -> outbox `.eml` files, parsed back with the stdlib `email` package."""

from __future__ import annotations

import email
import email.policy
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trio

from dispatcher import Settings, open_dispatcher
from dispatcher.app import create_app
from dispatcher.errors import RequestError, UpstreamError
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.files import FakeFilesService
from dispatcher.web import status_of

PDF = bytes(range(256)) * 8  # every byte value: a lossy transfer encoding would show
NOTES = "Grüße, notes\r\nline two\n".encode()
CSV = b"a,b\n1,2\n"
FILES = {
    "report.pdf": (PDF, "application/pdf"),
    "notes.txt": (NOTES, "text/plain; charset=utf-8"),
    "data.csv": (CSV, "text/csv"),
}
EMAIL_REQUEST = {"channels": ["email"], "clusters": ["c"], "messageTitle": "Hello", "messageContent": "Hi {{user._id}}"}


@pytest.fixture
def fake() -> FakeFilesService:
    return FakeFilesService(FILES)


@pytest.fixture
async def files_url(fake: FakeFilesService, nursery: trio.Nursery) -> str:
    return await nursery.start(serve_asgi, fake)


@pytest.fixture
def users(database: Any) -> list[str]:
    ids = [f"u{i}" for i in range(5)]
    database.users.insert_many(
        [
            {"_id": uid, "emailAddress": f"{uid}@example.com", "phoneNumber": f"+1555000000{i}", "clusters": ["c"]}
            for i, uid in enumerate(ids)
        ]
    )
    return ids


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connecting is refused, and nobody else can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def emails(outbox: Path) -> list[EmailMessage]:
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for p in sorted(outbox.glob("email/*.eml"))
    ]


def attachments(message: EmailMessage) -> dict[str, tuple[str, bytes]]:
    """filename -> (content type, exact bytes)."""
    return {
        part.get_filename(): (part.get_content_type(), part.get_payload(decode=True))
        for part in message.iter_attachments()
    }


def written(outbox: Path) -> list[Path]:
    return [p for p in outbox.rglob("*") if p.is_file()] if outbox.exists() else []


@asynccontextmanager
async def http_client(settings: Settings) -> AsyncIterator[Any]:
    async with open_dispatcher(settings) as d:
        app = create_app(d)
        async with app.test_app() as test_app:
            yield test_app.test_client()


async def test_request_attachments_reach_every_email_and_each_file_is_fetched_once(
    make_settings: Callable[..., Settings], files_url: str, fake: FakeFilesService, users: list[str], outbox: Path
) -> None:
    async with open_dispatcher(make_settings(files={"url": files_url})) as d:
        result = await d.send({**EMAIL_REQUEST, "emailAttachments": ["report.pdf", "notes.txt"]})

    assert result.summary.sent == {"email": 5} and result.failures == []
    assert fake.received == ["report.pdf", "notes.txt"]
    mails = emails(outbox)
    assert sorted(m["To"] for m in mails) == [f"{uid}@example.com" for uid in users]
    for mail in mails:
        assert attachments(mail) == {"report.pdf": ("application/pdf", PDF), "notes.txt": ("text/plain", NOTES)}
        assert mail.get_body(("plain",)).get_content().startswith("Hi u")


async def test_template_attachments_merge_with_the_request_and_duplicates_are_fetched_once(
    make_settings: Callable[..., Settings],
    files_url: str,
    fake: FakeFilesService,
    users: list[str],
    database: Any,
    outbox: Path,
) -> None:
    database.message_templates.insert_one(
        {
            "_id": "welcome",
            "emailTitle": "Welcome",
            "emailMessage": "Hi {{user._id}}",
            "emailAttachments": ["report.pdf", {"file": "notes.txt", "description": "extra keys are ignored"}],
        }
    )
    async with open_dispatcher(make_settings(files={"url": files_url})) as d:
        result = await d.send(
            {
                "channels": ["email"],
                "clusters": ["c"],
                "templateId": "welcome",
                "emailAttachments": ["notes.txt", "data.csv", "report.pdf"],
            }
        )

    assert result.summary.sent == {"email": 5}
    assert sorted(fake.received) == ["data.csv", "notes.txt", "report.pdf"]
    for mail in emails(outbox):
        assert attachments(mail) == {
            "report.pdf": ("application/pdf", PDF),
            "notes.txt": ("text/plain", NOTES),
            "data.csv": ("text/csv", CSV),
        }


async def test_missing_file_is_a_400_naming_it_and_nothing_is_sent_on_any_channel(
    make_settings: Callable[..., Settings], files_url: str, fake: FakeFilesService, users: list[str], outbox: Path
) -> None:
    async with open_dispatcher(make_settings(files={"url": files_url})) as d:
        with pytest.raises(RequestError) as caught:
            await d.send(
                {**EMAIL_REQUEST, "channels": ["email", "sms"], "emailAttachments": ["report.pdf", "ghost.pdf"]}
            )

    assert status_of(caught.value) == 400 and "ghost.pdf" in str(caught.value)
    assert fake.received == ["report.pdf", "ghost.pdf"]
    assert written(outbox) == []


async def test_missing_file_over_http_is_a_400_json_error(
    make_settings: Callable[..., Settings], files_url: str, users: list[str], outbox: Path
) -> None:
    async with http_client(make_settings(files={"url": files_url})) as client:
        response = await client.post("/send", json={**EMAIL_REQUEST, "emailAttachments": ["ghost.pdf"]})
        body = await response.get_json()

    assert response.status_code == 400
    assert body["statusCode"] == 400 and body["error"] == "Bad Request" and "ghost.pdf" in body["message"]
    assert written(outbox) == []


async def test_attachments_over_the_total_cap_are_a_400_and_nothing_is_sent(
    make_settings: Callable[..., Settings], files_url: str, fake: FakeFilesService, users: list[str], outbox: Path
) -> None:
    # Each file fits under the cap alone; together they do not (one e-mail carries them all).
    cap = len(PDF) + len(NOTES) - 1
    async with open_dispatcher(make_settings(files={"url": files_url, "max_attachment_bytes": cap})) as d:
        with pytest.raises(RequestError) as caught:
            await d.send({**EMAIL_REQUEST, "emailAttachments": ["report.pdf", "notes.txt"]})

    assert status_of(caught.value) == 400 and str(cap) in str(caught.value)
    assert written(outbox) == []


async def test_attachments_exactly_at_the_cap_are_sent(
    make_settings: Callable[..., Settings], files_url: str, users: list[str], outbox: Path
) -> None:
    cap = len(PDF) + len(NOTES)
    async with open_dispatcher(make_settings(files={"url": files_url, "max_attachment_bytes": cap})) as d:
        result = await d.send({**EMAIL_REQUEST, "emailAttachments": ["report.pdf", "notes.txt"]})

    assert result.summary.sent == {"email": 5}
    assert all(len(attachments(m)) == 2 for m in emails(outbox))


async def test_files_service_answering_503_is_a_502_in_the_error_shape(
    make_settings: Callable[..., Settings], files_url: str, fake: FakeFilesService, users: list[str], outbox: Path
) -> None:
    fake.faults.script.append("transient")
    async with http_client(make_settings(files={"url": files_url})) as client:
        response = await client.post("/send", json={**EMAIL_REQUEST, "emailAttachments": ["report.pdf"]})
        body = await response.get_json()

    assert response.status_code == 502
    assert body["statusCode"] == 502 and body["error"] == "Bad Gateway" and "503" in body["message"]
    assert fake.received == ["report.pdf"]  # the file exists: only the service's answer made it fail
    assert written(outbox) == []


async def test_files_service_down_is_a_502_and_nothing_is_sent(
    make_settings: Callable[..., Settings], closed_port: int, users: list[str], outbox: Path
) -> None:
    async with open_dispatcher(make_settings(files={"url": f"http://127.0.0.1:{closed_port}"})) as d:
        with pytest.raises(UpstreamError) as caught:
            await d.send({**EMAIL_REQUEST, "emailAttachments": ["report.pdf"]})

    assert status_of(caught.value) == 502
    assert written(outbox) == []


async def test_stalled_files_service_times_out_as_a_502(
    make_settings: Callable[..., Settings], files_url: str, fake: FakeFilesService, users: list[str], outbox: Path
) -> None:
    fake.faults.script.append("stall")
    settings = make_settings(files={"url": files_url, "timeout_seconds": 0.3})
    async with open_dispatcher(settings) as d:
        with pytest.raises(UpstreamError) as caught:
            await d.send({**EMAIL_REQUEST, "emailAttachments": ["report.pdf"]})

    assert status_of(caught.value) == 502 and fake.received == ["report.pdf"]
    assert written(outbox) == []


async def test_attachments_without_a_files_service_are_a_400(
    make_settings: Callable[..., Settings], users: list[str], outbox: Path
) -> None:
    async with open_dispatcher(make_settings()) as d:
        with pytest.raises(RequestError) as caught:
            await d.send({**EMAIL_REQUEST, "emailAttachments": ["report.pdf"]})

    assert status_of(caught.value) == 400 and "[files].url" in str(caught.value)
    assert written(outbox) == []


async def test_hostile_names_travel_as_one_segment_and_nothing_is_read_locally(
    make_settings: Callable[..., Settings], files_url: str, fake: FakeFilesService, users: list[str], outbox: Path
) -> None:
    hostile = ["../../etc/passwd", "a/b.txt", "%2e%2e"]
    fake.files.update({name: (f"served by the fake as {name}".encode(), "text/plain") for name in hostile})
    async with open_dispatcher(make_settings(files={"url": files_url})) as d:
        result = await d.send({**EMAIL_REQUEST, "emailAttachments": hostile})

    assert result.summary.sent == {"email": 5}
    assert fake.received == hostile and fake.stray == []
    local = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else b"root:x:0:0:"
    for mail in emails(outbox):
        # A file name in an e-mail is never a path (mail clients save attachments by that name).
        assert attachments(mail) == {
            "passwd": ("text/plain", b"served by the fake as ../../etc/passwd"),
            "b.txt": ("text/plain", b"served by the fake as a/b.txt"),
            "%2e%2e": ("text/plain", b"served by the fake as %2e%2e"),
        }
        assert all(local not in part for _, part in attachments(mail).values())
    assert all(local not in p.read_bytes() for p in written(outbox))


@pytest.mark.parametrize("name", [".", ".."])
async def test_template_dot_segment_names_never_leave_the_download_route(
    make_settings: Callable[..., Settings],
    files_url: str,
    fake: FakeFilesService,
    users: list[str],
    database: Any,
    outbox: Path,
    name: str,
) -> None:
    # Request names "." and ".." are refused by SendRequest; template names are not validated there.
    database.message_templates.insert_one(
        {"_id": "dots", "emailTitle": "T", "emailMessage": "M", "emailAttachments": [name]}
    )
    async with open_dispatcher(make_settings(files={"url": files_url})) as d:
        with pytest.raises(RequestError) as caught:
            await d.send({"channels": ["email"], "clusters": ["c"], "templateId": "dots"})

    assert status_of(caught.value) == 400
    assert fake.stray == []
    assert written(outbox) == []


@pytest.mark.parametrize("files_configured", [True, False])
async def test_email_attachments_are_ignored_when_email_is_not_requested(
    make_settings: Callable[..., Settings],
    files_url: str,
    fake: FakeFilesService,
    users: list[str],
    database: Any,
    outbox: Path,
    files_configured: bool,
) -> None:
    # Like emailCarbonCopies, emailAttachments only shape e-mails: an sms-only send fetches nothing,
    # so neither a missing file nor a missing Files Service can refuse it.
    database.message_templates.insert_one(
        {"_id": "sms", "smsMessage": "Hi {{user._id}}", "emailAttachments": ["report.pdf"]}
    )
    settings = make_settings(files={"url": files_url}) if files_configured else make_settings()
    async with open_dispatcher(settings) as d:
        result = await d.send(
            {
                "channels": ["sms"],
                "clusters": ["c"],
                "templateId": "sms",
                "emailAttachments": ["ghost.pdf", "report.pdf"],
            }
        )

    assert result.summary.sent == {"sms": 5} and result.failures == []
    assert fake.received == [] and fake.stray == []
    assert len(list((outbox / "sms").glob("*.json"))) == 5 and not (outbox / "email").exists()
