"""`dispatcher.mime.build_email`: what it writes, parsed back by the stdlib's modern parser.

Every message is checked in both the forms it leaves the service in: `as_bytes()` (the outbox's
`.eml`) and the SMTP provider's wire form (`_Wire`, what smtpproto sends).
"""

from __future__ import annotations

import datetime
import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage, Message
from email.policy import Policy, compat32

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.messages import Attachment, EmailContent, EmailOptions
from dispatcher.mime import POLICY, build_email, envelope_recipients
from dispatcher.providers.smtp import _Wire

TO = "ann@example.com"
SENDER = "Shop <shop@example.com>"


def content(
    subject: str = "Hello", text: str | None = "Hi there\n", html: str | None = None, **options: object
) -> EmailContent:
    return EmailContent(subject, text, html, EmailOptions(**{"sender": SENDER, **options}))  # type: ignore[arg-type]


def serialized(mail: Message, smtputf8: bool = False) -> Iterator[bytes]:
    yield mail.as_bytes()
    yield _Wire(mail).as_bytes(policy=email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP)


def parsed(data: bytes, strict: bool = True) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not (strict and message.defects), message.defects
    return message


def both(c: EmailContent, to: str = TO, strict: bool = True) -> list[tuple[bytes, EmailMessage]]:
    """The message for `to` in both forms, with the checks every message passes."""
    forms = []
    for data in serialized(build_email(c, to)):
        assert data.isascii()  # 7bit throughout: no 8BITMIME needed
        assert max(len(line) for line in data.splitlines()) <= 78
        forms.append((data, parsed(data, strict)))
    return forms


def header_names(message: Message) -> list[str]:
    return [name.lower() for name in message.keys()]


# -- headers ------------------------------------------------------------------------------------


def test_headers_of_a_plain_message() -> None:
    c = content(cc=("cc@example.com",), bcc=("hidden@example.com",))
    for data, message in both(c):
        assert message["Subject"] == "Hello"
        assert message["From"].addresses[0].display_name == "Shop"
        assert message["From"].addresses[0].addr_spec == "shop@example.com"
        assert message["To"] == TO
        assert message["Cc"] == "cc@example.com"
        assert message["MIME-Version"] == "1.0"
        assert "bcc" not in header_names(message) and b"hidden@example.com" not in data
        assert sorted(header_names(message)) == sorted(
            [
                "subject",
                "from",
                "to",
                "cc",
                "date",
                "message-id",
                "mime-version",
                "content-type",
                "content-transfer-encoding",
            ]
        )
        date = message["Date"].datetime
        assert date.tzinfo is not None
        assert abs(date - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=1)
        assert message["Message-ID"].startswith("<") and message["Message-ID"].endswith("@example.com>")
    assert envelope_recipients(c, TO) == [TO, "cc@example.com", "hidden@example.com"]


def test_message_id_is_unique_and_from_the_bare_senders_domain() -> None:
    ids = {build_email(content(sender="noreply@mail.example.org"), TO)["Message-ID"] for _ in range(50)}
    assert len(ids) == 50 and all(i.endswith("@mail.example.org>") for i in ids)


@pytest.mark.parametrize(
    "subject",
    [
        "Grüße aus Köln",
        "你好，世界 — 注文番号 12345 の発送のお知らせ",
        "Your order has shipped 🎉📦",
        "Ünïcödé " * 20 + "🎉 end",  # several encoded-words over several lines
        "A plain ASCII subject that is long enough that it has to be folded onto a second line or two",
        "spaced  out, trailing  ",
    ],
)
def test_subject_round_trips(subject: str) -> None:
    for data, message in both(content(subject)):
        assert message["Subject"] == subject
        if not subject.isascii():
            assert b"=?utf-8?" in data


@pytest.mark.parametrize(
    ("sender", "name", "address"),
    [
        ('"Läden Ü" <shop@example.com>', "Läden Ü", "shop@example.com"),
        ("Zoë Ångström <zoe@example.com>", "Zoë Ångström", "zoe@example.com"),
        ('"Shop, Inc." <shop@example.com>', "Shop, Inc.", "shop@example.com"),
        ("shop@example.com", "", "shop@example.com"),
    ],
)
def test_from_display_name_is_encoded_and_the_address_is_not(sender: str, name: str, address: str) -> None:
    for data, message in both(content(sender=sender)):
        [mailbox] = message["From"].addresses
        assert (mailbox.display_name, mailbox.addr_spec) == (name, address)
        raw = next(line for line in data.splitlines() if line.startswith(b"From:"))
        assert f"<{address}>".encode() in raw or raw == f"From: {address}".encode()
        if not name.isascii():
            assert b"=?utf-8?" in raw


def test_cc_display_names_and_many_addresses() -> None:
    cc = (
        "Zoë <zoe@example.com>",
        "plain@example.com",
        '"Doe, John" <john@example.com>',
        *(f"user{i}@example.com" for i in range(8)),
    )
    for _, message in both(content(cc=cc)):
        got = [(a.display_name, a.addr_spec) for a in message["Cc"].addresses]
        assert got == [
            ("Zoë", "zoe@example.com"),
            ("", "plain@example.com"),
            ("Doe, John", "john@example.com"),
            *(("", f"user{i}@example.com") for i in range(8)),
        ]


# -- bodies -------------------------------------------------------------------------------------


def test_text_only() -> None:
    for _, message in both(content(text="Hello Ada,\nyour order shipped.\n")):
        assert message.get_content_type() == "text/plain"
        assert message.get_content_charset() == "us-ascii" and message["Content-Transfer-Encoding"] == "7bit"
        assert message.get_content() in ("Hello Ada,\nyour order shipped.\n", "Hello Ada,\r\nyour order shipped.\r\n")


def test_html_only() -> None:
    for _, message in both(content(text=None, html="<p>Hello <b>Ada</b></p>")):
        assert message.get_content_type() == "text/html"
        assert message.get_content().rstrip("\r\n") == "<p>Hello <b>Ada</b></p>"


def test_non_ascii_text_is_quoted_printable_utf8() -> None:
    text = "Grüße, Ada — 你好 🎉"
    for data, message in both(content(text=text)):
        assert message.get_content_charset() == "utf-8"
        assert message["Content-Transfer-Encoding"] == "quoted-printable"
        assert b"Gr=C3=BC=C3=9Fe" in data
        assert message.get_content().rstrip("\r\n") == text


def test_alternative_has_plain_then_html() -> None:
    text, html = "Grüße, Ada — 你好 🎉", "<p>Grüße, <b>Ada</b> — 你好 🎉</p>"
    for _, message in both(content(text=text, html=html)):
        assert message.get_content_type() == "multipart/alternative"
        parts = list(message.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
        assert [p.get_content() for p in parts] == [text, html]
        assert message.get_body(("html",)).get_content() == html


def test_ascii_alternative_stays_7bit() -> None:
    for _, message in both(content(text="Hi Ada", html="<p>Hi Ada</p>")):
        assert [(p.get_content_charset(), p["Content-Transfer-Encoding"]) for p in message.iter_parts()] == [
            ("us-ascii", "7bit"),
            ("us-ascii", "7bit"),
        ]
        assert [p.get_content() for p in message.iter_parts()] == ["Hi Ada", "<p>Hi Ada</p>"]


@pytest.mark.parametrize("line", ["x" * 5000, "ü" * 5000, ("word " * 1000).strip()])
def test_a_5000_character_line_survives_and_no_line_exceeds_998(line: str) -> None:
    for data, message in both(content(text=line, html=f"<p>{line}</p>")):
        assert max(len(raw) for raw in data.splitlines()) <= 998
        plain, html = (p.get_content() for p in message.iter_parts())
        assert (plain, html) == (line, f"<p>{line}</p>")
        assert message.get_body(("plain",))["Content-Transfer-Encoding"] == "quoted-printable"


def test_ascii_text_with_a_nul_is_not_7bit() -> None:
    for _, message in both(content(text="a\0b")):
        assert message["Content-Transfer-Encoding"] == "quoted-printable"
        assert message.get_content().rstrip("\r\n") == "a\0b"


def test_attachments() -> None:
    pdf = bytes(range(256)) * 8
    attachments = (
        Attachment("report.pdf", "application/pdf", pdf),
        Attachment("Grüße 你好.txt", "text/plain", "Grüße\r\n".encode()),
        Attachment("data", "not a type", b"\x00\x01"),
        Attachment("mail.eml", "message/rfc822", b"Subject: x\r\n\r\nbody\r\n"),
    )
    for data, message in both(
        content(text="See attached — Grüße", html="<p>See attached</p>", attachments=attachments)
    ):
        assert message.get_content_type() == "multipart/mixed"
        body, *files = message.iter_parts()
        assert body.get_content_type() == "multipart/alternative"
        assert message.get_body(("plain",)).get_content() == "See attached — Grüße"
        got = [
            (
                p.get_filename(),
                p.get_content_type(),
                p.get_content_disposition(),
                p["Content-Transfer-Encoding"],
                p.get_payload(decode=True),
            )
            for p in files
        ]
        assert got == [
            ("report.pdf", "application/pdf", "attachment", "base64", pdf),
            ("Grüße 你好.txt", "text/plain", "attachment", "base64", "Grüße\r\n".encode()),
            ("data", "application/octet-stream", "attachment", "base64", b"\x00\x01"),
            ("mail.eml", "application/octet-stream", "attachment", "base64", b"Subject: x\r\n\r\nbody\r\n"),
        ]
        assert b"filename*=utf-8''Gr%C3%BC%C3%9Fe%20%E4%BD%A0%E5%A5%BD.txt" in data.replace(b"\r\n ", b"").replace(
            b"\n ", b""
        )


@pytest.mark.parametrize("name", ["a" * 300 + ".pdf", "Grüße 你好 " * 40 + ".pdf"])
def test_a_long_file_name_is_split_into_rfc2231_continuations(name: str) -> None:
    for data, message in both(content(attachments=(Attachment(name, "application/pdf", b"%PDF"),))):
        [part] = message.iter_attachments()
        assert part.get_filename() == name and part.get_payload(decode=True) == b"%PDF"
        assert b"filename*1" in data  # both() checked that no line is over 78


def test_attachments_with_a_single_body() -> None:
    [(_, message), _] = both(content(text="Hi", attachments=(Attachment("a.bin", "application/x-thing", b"x"),)))
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "application/x-thing"]


# -- header injection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "Hi\r\nBcc: evil@x",
        "Hi\nBcc: evil@x",
        "Hi\rBcc: evil@x",
        "Hi\x1cBcc: evil@x",  # str.splitlines() breaks here, and EmailPolicy folds with it
        "Hi\u2028Bcc: evil@x",
        "Grüße\r\nBcc: evil@x",
        "Hi\r\n\r\nBody from the subject",
    ],
)
def test_a_line_break_in_the_subject_never_makes_a_header(subject: str) -> None:
    for _data, message in both(content(subject)):
        assert header_names(message).count("subject") == 1
        assert "bcc" not in header_names(message)
        assert "\n" not in message["Subject"] and "\r" not in message["Subject"]
        assert message["Subject"] == " ".join(subject.splitlines())
        assert message.get_content() in ("Hi there\n", "Hi there\r\n")


def test_a_line_break_in_other_headers_never_makes_a_header() -> None:
    c = content(
        sender="Shop\r\nBcc: evil@x <shop@example.com>",
        cc=("Zoë\nBcc: evil@x <z@example.com>",),
        attachments=(Attachment("a\r\nBcc: evil@x.txt", "text/plain", b"x"),),
    )
    for _, message in both(c, to="ann@example.com\r\nBcc: evil@x", strict=False):
        for part in message.walk():
            assert "bcc" not in header_names(part)
        assert [p.get_filename() for p in message.iter_attachments()] == ["a Bcc: evil@x.txt"]


# -- the two serializations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "c",
    [
        content(),
        content(
            "Grüße 🎉",
            text="ü" * 3000,
            html="<p>Grüße</p>",
            sender='"Läden Ü" <shop@example.com>',
            cc=("Zoë <z@example.com>", *(f"u{i}@example.com" for i in range(9))),
        ),
        content(
            ("A long subject " * 8).strip(),
            text=None,
            html="<p>x</p>",
            attachments=(Attachment("Grüße " * 12 + ".pdf", "application/pdf", bytes(3000)),),
        ),
    ],
    ids=["plain", "non-ascii", "attachment"],
)
def test_wire_form_is_what_policy_smtp_would_write(c: EmailContent) -> None:
    mail = build_email(c, TO)
    wire = _Wire(mail).as_bytes(policy=email.policy.SMTP)
    assert wire == ended(mail.as_bytes(policy=email.policy.SMTP))
    assert wire == ended(mail.as_bytes().replace(b"\n", b"\r\n"))
    assert b"\n" not in wire.replace(b"\r\n", b"")


def ended(data: bytes) -> bytes:
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def test_wire_form_ends_the_last_line_for_smtps_final_dot() -> None:
    # smtpproto appends ".\r\n" to the data as it is: without a line end the server waits forever.
    for text, body in (("no newline", b"\r\n\r\nno newline\r\n"), ("newline\n", b"\r\n\r\nnewline\r\n")):
        assert _Wire(build_email(content(text=text), TO)).as_bytes(policy=email.policy.SMTP).endswith(body)
    wire = _Wire(build_email(content(text="a", html="b"), TO)).as_bytes(policy=email.policy.SMTP)
    assert wire.endswith(b"--\r\n") and not wire.endswith(b"\r\n\r\n")


def test_smtputf8_address_is_written_as_utf8() -> None:
    mail = build_email(content(sender="Zoë <zoë@exämple.com>", cc=("Jürgen <jürgen@exämple.com>",)), "üser@exämple.com")
    wire = _Wire(mail).as_bytes(policy=email.policy.SMTPUTF8)
    message = email.message_from_string(wire.decode("utf-8"), policy=email.policy.default)
    assert message["To"] == "üser@exämple.com"
    assert [(a.display_name, a.addr_spec) for a in message["From"].addresses] == [("Zoë", "zoë@exämple.com")]
    assert [(a.display_name, a.addr_spec) for a in message["Cc"].addresses] == [("Jürgen", "jürgen@exämple.com")]
    assert "üser@exämple.com".encode() in wire


@given(
    st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=100),
    st.sampled_from(["Subject", "From", "Content-Type", "X-Envelope-Bcc"]),
)
def test_policy_writes_what_compat32_writes(value: str, name: str) -> None:
    # Its shortcut must not change a byte: compat32 is the reference.
    def fold(policy: Policy) -> bytes | type[Exception]:
        try:
            return policy.fold_binary(name, value)
        except Exception as exc:  # compat32 refuses what looks like an embedded header
            return type(exc)

    for linesep in ("\n", "\r\n"):
        assert fold(POLICY.clone(linesep=linesep)) == fold(compat32.clone(linesep=linesep))
