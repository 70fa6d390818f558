"""The SMTP provider against a real SMTP server (the aiosmtpd sink) on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dispatcher import Settings, open_dispatcher
from dispatcher.errors import PermanentDeliveryError, TransientDeliveryError
from dispatcher.fakes.smtp import SmtpSink
from dispatcher.messages import Attachment, EmailContent, EmailOptions, Message
from dispatcher.providers.smtp import SmtpProvider
from dispatcher.sections import SmtpSettings


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


def _smtp_settings(
    make_settings: Callable[..., Settings], sink: SmtpSink, concurrency: int = 16, **smtp: Any
) -> Settings:
    return make_settings(
        channels={
            "email": {
                "provider": "smtp",
                "max_attempts": 3,
                "backoff_initial_seconds": 0.01,
                "concurrency": concurrency,
            }
        },
        providers={"smtp": {"host": sink.host, "port": sink.port, "security": "none", **smtp}},
    )


def _message(to: str = "ann@example.com", **options: Any) -> Message:
    content = EmailContent(
        subject="Hello", text="Hi there", html=None, options=EmailOptions(sender="noreply@example.com", **options)
    )
    return Message("email", "u1", (to,), content)


# -- a test CA and a server certificate for 127.0.0.1 ------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_pem: str
    cert_file: str
    key_file: str

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("pki")
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Pki(ca_cert.public_bytes(serialization.Encoding.PEM).decode(), str(cert_file), str(key_file))


# -- end to end through the dispatcher --------------------------------------------------------


async def test_email_headers_envelope_and_escaping(make_settings, database, sink: SmtpSink) -> None:
    database.users.insert_one({"_id": "u1", "name": "<script>", "emailAddress": "ann@example.com"})
    database.message_templates.insert_one(
        {
            "_id": "welcome",
            "name": "welcome",
            "emailTitle": "Welcome {{user.name}}",
            "emailMessage": "Hi {{user.name}}, code {{data.code}}",
            "emailHtmlMessage": "<p>Hi {{user.name}}</p>",
        }
    )
    async with open_dispatcher(_smtp_settings(make_settings, sink)) as d:
        result = await d.send(
            {
                "channels": ["email"],
                "recipients": ["u1"],
                "templateId": "welcome",
                "data": {"code": "42"},
                "emailSender": "campaigns@example.org",
                "emailCarbonCopies": ["cc@example.com"],
                "emailBlindCarbonCopies": ["hidden@example.com"],
            }
        )
    assert result.failures == [] and result.summary.sent == {"email": 1}

    [mail] = sink.messages()
    assert mail.mail_from == "campaigns@example.org"
    assert mail.rcpt_tos == ("ann@example.com", "cc@example.com", "hidden@example.com")
    assert b"hidden@example.com" not in mail.data
    msg = mail.message()
    assert msg["Subject"] == "Welcome <script>"
    assert msg["From"] == "campaigns@example.org"
    assert msg["To"] == "ann@example.com"
    assert msg["Cc"] == "cc@example.com"
    assert msg["Bcc"] is None
    assert msg["Message-ID"] and msg["Date"]
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "Hi <script>, code 42" in text
    assert "<p>Hi &lt;script&gt;</p>" in html and "<script>" not in html


async def test_refused_recipient_fails_alone(make_settings, database, sink: SmtpSink) -> None:
    database.users.insert_many([{"_id": f"u{i}", "emailAddress": f"user{i}@example.com"} for i in range(3)])
    sink.reject("user1@example.com")
    async with open_dispatcher(_smtp_settings(make_settings, sink)) as d:
        result = await d.send(
            {"channels": ["email"], "recipients": ["u0", "u1", "u2"], "messageTitle": "T", "messageContent": "Hello"}
        )
    [failure] = result.failures
    assert failure.user_id == "u1" and failure.channel == "email"
    assert "SMTP 550" in failure.error and "(after" not in failure.error  # permanent: not retried
    assert result.summary.sent == {"email": 2} and result.summary.failed == {"email": 1}
    received = sink.messages()
    assert sorted(m.message()["To"] for m in received) == ["user0@example.com", "user2@example.com"]
    assert {m.mail_from for m in received} == {"noreply@example.com"}  # the configured sender


async def test_connection_dropped_mid_batch_delivers_each_once(make_settings, database, sink: SmtpSink) -> None:
    addresses = [f"user{i}@example.com" for i in range(10)]
    database.users.insert_many([{"_id": f"u{i}", "emailAddress": a} for i, a in enumerate(addresses)])
    sink.drop_after(3)
    async with open_dispatcher(_smtp_settings(make_settings, sink, concurrency=1)) as d:
        result = await d.send(
            {
                "channels": ["email"],
                "recipients": [f"u{i}" for i in range(10)],
                "messageTitle": "T",
                "messageContent": "Hello",
            }
        )
    assert result.failures == [] and result.summary.sent == {"email": 10}
    assert Counter(m.message()["To"] for m in sink.messages()) == Counter(addresses)
    assert sink.connections == 2  # one connection, dropped by the server, then one fresh one


async def test_deferred_message_is_retried_once_accepted(make_settings, database, sink: SmtpSink) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "ann@example.com"})
    sink.defer_next(2)
    async with open_dispatcher(_smtp_settings(make_settings, sink)) as d:
        result = await d.send(
            {"channels": ["email"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "Hello"}
        )
    assert result.failures == [] and result.summary.sent == {"email": 1}
    assert [m.rcpt_tos for m in sink.messages()] == [("ann@example.com",)]


async def test_connections_are_bounded_by_the_channel_concurrency(make_settings, database, sink: SmtpSink) -> None:
    database.users.insert_many([{"_id": f"u{i}", "emailAddress": f"user{i}@example.com"} for i in range(12)])
    async with open_dispatcher(_smtp_settings(make_settings, sink, concurrency=2, pool_size=2)) as d:
        result = await d.send(
            {
                "channels": ["email"],
                "recipients": [f"u{i}" for i in range(12)],
                "messageTitle": "T",
                "messageContent": "Hello",
            }
        )
    assert result.summary.sent == {"email": 12}
    assert len(sink.messages()) == 12
    assert 1 <= sink.connections <= 2


# -- the provider on its own -------------------------------------------------------------------


async def test_connections_are_reused(sink: SmtpSink) -> None:
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    for i in range(5):
        await provider.send(_message(f"user{i}@example.com"), f"user{i}@example.com")
    await provider.aclose()
    assert len(sink.messages()) == 5
    assert sink.connections == 1


async def test_starttls_and_auth(pki: Pki) -> None:
    with SmtpSink(starttls_context=pki.server_context(), credentials=("u", "p")) as sink:
        settings = SmtpSettings.model_validate(
            {"host": sink.host, "port": sink.port, "security": "starttls", "username": "u", "password": "p"}
        )
        provider = SmtpProvider(settings, ssl_context=pki.client_context())
        await provider.send(_message(), "ann@example.com")
        await provider.aclose()
        [mail] = sink.messages()
    assert mail.tls and mail.login == "u"
    assert mail.rcpt_tos == ("ann@example.com",) and mail.message()["Subject"] == "Hello"


async def test_wrong_password_is_permanent(pki: Pki) -> None:
    with SmtpSink(starttls_context=pki.server_context(), credentials=("u", "p")) as sink:
        settings = SmtpSettings.model_validate(
            {"host": sink.host, "port": sink.port, "security": "starttls", "username": "u", "password": "wrong"}
        )
        provider = SmtpProvider(settings, ssl_context=pki.client_context())
        with pytest.raises(PermanentDeliveryError, match="SMTP 535"):
            await provider.send(_message(), "ann@example.com")
        await provider.aclose()
        assert sink.messages() == []


async def test_settings_password_reaches_the_server(make_settings, database) -> None:
    # The dispatcher's factory builds the provider from settings alone: plain text here, as
    # its one-argument constructor cannot be handed the test CA.
    with SmtpSink(credentials=("u", "p")) as sink:
        database.users.insert_one({"_id": "u1", "emailAddress": "ann@example.com"})
        settings = _smtp_settings(make_settings, sink, username="u", password="p")
        async with open_dispatcher(settings) as d:
            result = await d.send(
                {"channels": ["email"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "Hello"}
            )
        assert result.failures == []
        assert [m.login for m in sink.messages()] == ["u"]


async def test_certificate_is_verified_by_default(pki: Pki) -> None:
    with SmtpSink(starttls_context=pki.server_context()) as sink:
        provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="starttls"))
        with pytest.raises(TransientDeliveryError, match="TLS handshake failed.*CERTIFICATE_VERIFY_FAILED"):
            await provider.send(_message(), "ann@example.com")
        await provider.aclose()
        assert sink.messages() == []


async def test_starttls_required_when_configured(sink: SmtpSink) -> None:
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="starttls"))
    with pytest.raises(PermanentDeliveryError, match="does not offer STARTTLS"):
        await provider.send(_message(), "ann@example.com")
    await provider.aclose()
    assert sink.messages() == []


async def test_implicit_tls(pki: Pki) -> None:
    with SmtpSink(tls_context=pki.server_context()) as sink:
        provider = SmtpProvider(
            SmtpSettings(host=sink.host, port=sink.port, security="tls"), ssl_context=pki.client_context()
        )
        await provider.send(_message(), "ann@example.com")
        await provider.aclose()
        [mail] = sink.messages()
    assert mail.tls and mail.message()["To"] == "ann@example.com"


async def test_refused_cc_does_not_fail_the_delivery(sink: SmtpSink) -> None:
    sink.reject("gone@example.com")
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    await provider.send(_message(cc=("gone@example.com", "cc@example.com")), "ann@example.com")
    await provider.aclose()
    [mail] = sink.messages()
    assert mail.rcpt_tos == ("ann@example.com", "cc@example.com")
    assert mail.message()["Cc"] == "gone@example.com, cc@example.com"


async def test_421_is_transient_throttle_and_drops_the_connection(sink: SmtpSink) -> None:
    sink.faults.script.append("throttle")
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    with pytest.raises(TransientDeliveryError, match="SMTP 421") as caught:
        await provider.send(_message(), "ann@example.com")
    assert caught.value.throttled
    await provider.send(_message("bob@example.com"), "bob@example.com")
    await provider.aclose()
    assert [m.rcpt_tos for m in sink.messages()] == [("bob@example.com",)]
    assert sink.connections == 2


async def test_connection_lost_is_transient_and_never_reused(sink: SmtpSink) -> None:
    sink.hang_up_next(1)
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    with pytest.raises(TransientDeliveryError, match="SMTP connection lost"):
        await provider.send(_message(), "ann@example.com")
    await provider.send(_message("bob@example.com"), "bob@example.com")
    await provider.aclose()
    assert [m.rcpt_tos for m in sink.messages()] == [("bob@example.com",)]
    assert sink.connections == 2


async def test_idle_connection_closed_by_server_is_replaced_before_use(sink: SmtpSink) -> None:
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    sink.drop_after(1)
    await provider.send(_message(), "ann@example.com")
    assert await trio.to_thread.run_sync(sink.wait_closed, 1, 5.0)
    # Costs no failed attempt: the pool notices the hang-up before starting a transaction.
    await provider.send(_message("bob@example.com"), "bob@example.com")
    await provider.aclose()
    assert [m.rcpt_tos for m in sink.messages()] == [("ann@example.com",), ("bob@example.com",)]
    assert sink.connections == 2


async def test_refused_primary_is_permanent_and_keeps_the_connection(sink: SmtpSink) -> None:
    sink.reject("gone@example.com")
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    with pytest.raises(PermanentDeliveryError, match="SMTP 550: 5.1.1 <gone@example.com>"):
        await provider.send(_message("gone@example.com", cc=("cc@example.com",)), "gone@example.com")
    await provider.send(_message("bob@example.com"), "bob@example.com")
    await provider.aclose()
    assert [m.rcpt_tos for m in sink.messages()] == [("bob@example.com",)]
    assert sink.connections == 1  # RSET, not a new connection


async def test_aclose_quits_pooled_connections(sink: SmtpSink) -> None:
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    await provider.send(_message(), "ann@example.com")
    assert sink.closed == 0
    await provider.aclose()
    assert await trio.to_thread.run_sync(sink.wait_closed, 1, 5.0)


async def test_interrupted_connection_is_not_reused(sink: SmtpSink) -> None:
    sink.faults.script.append("stall")
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    with trio.move_on_after(0.2) as scope:
        await provider.send(_message(), "ann@example.com")
    assert scope.cancelled_caught
    await provider.send(_message("bob@example.com"), "bob@example.com")
    await provider.aclose()
    # A reused connection would have read the stalled message's late answer as its own.
    assert [m.rcpt_tos for m in sink.messages()] == [("bob@example.com",)]
    assert sink.connections == 2


async def test_unreachable_server_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = SmtpProvider(SmtpSettings(host="127.0.0.1", port=port, security="none"))
    with pytest.raises(TransientDeliveryError, match="SMTP connection failed"):
        await provider.send(_message(), "ann@example.com")
    await provider.aclose()


async def test_attachment_arrives_with_name_and_type(sink: SmtpSink) -> None:
    pdf = b"%PDF-1.4 fake\x00\xff"
    provider = SmtpProvider(SmtpSettings(host=sink.host, port=sink.port, security="none"))
    await provider.send(_message(attachments=(Attachment("report.pdf", "application/pdf", pdf),)), "ann@example.com")
    await provider.aclose()
    [mail] = sink.messages()
    [part] = list(mail.message().iter_attachments())
    assert part.get_filename() == "report.pdf"
    assert part.get_content_type() == "application/pdf"
    assert part.get_content() == pdf
