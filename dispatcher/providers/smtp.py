"""E-mail over SMTP: a small pool of persistent connections shared by every concurrent sender.

The protocol state machine is `smtpproto`'s sans-io `SMTPClientProtocol` (reply parsing, EHLO
extensions, 8BITMIME/SMTPUTF8, dot-stuffing); the I/O is driven here on Trio streams. Its own
AnyIO session is not used because it cannot do implicit TLS, upgrades with STARTTLS only when
the server offers it (a silent downgrade for `security = "starttls"`, an unwanted upgrade for
`"none"`) and aborts the whole message when any one recipient is refused.

Delivery semantics: `send` makes one attempt and never re-sends on its own. A connection that
fails or is interrupted (cancelled by the caller's timeout) is discarded, never reused; the
shared retry layer decides whether to try again. The only duplicate SMTP itself allows remains:
a connection lost after the message's final dot was sent and before the server's answer.
"""

from __future__ import annotations

import base64
import logging
import re
import select
import socket
import ssl
from collections.abc import Callable
from email.message import Message as MimeMessage
from email.policy import Policy
from email.utils import parseaddr
from typing import Any

import trio
from smtpproto.protocol import ClientState, SMTPClientProtocol, SMTPException, SMTPProtocolViolation, SMTPResponse

from ..errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from ..messages import EmailContent, Message
from ..mime import POLICY, build_email, envelope_recipients
from ..sections import SmtpSettings


log = logging.getLogger(__name__)

# Servers drop idle sessions (RFC 5321 asks them to wait at least 5 minutes; many wait less):
# an older idle connection is closed rather than risked on a message.
_MAX_IDLE_SECONDS = 60.0
_QUIT_TIMEOUT_SECONDS = 2.0
# smtpproto reports a reply it did not expect in the current state (a 421 to MAIL, a 451 after
# the data) as a protocol violation whose text carries the code.
_UNEXPECTED_REPLY = re.compile(r"Unexpected response: (\d{3}) ?(.*)", re.DOTALL)
_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_WIRE_POLICY = POLICY.clone(linesep="\r\n")


class _Reply(Exception):
    """The server answered with an error code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = " ".join(text.split())


class _ConnectionLost(Exception):
    """The server closed the connection (EOF) or answered gibberish."""


class _Wire:
    """A message from `mime.build_email` as smtpproto's `data()` takes it (`in`, `as_bytes(policy=)`).

    smtpproto writes it with `policy.SMTP`, an `EmailPolicy`, whose generator runs every header it
    reads (Content-Type, boundary) through the header registry's parser again: most of what
    building with compat32 saves. The message's headers are ASCII, encoded and folded, and its
    bodies 7bit, so its own policy with CRLF writes the same message (tests/test_mime.py compares
    the bytes); only an SMTPUTF8 transaction (an address that is not ASCII, to be written as
    UTF-8) keeps smtpproto's policy.
    """

    def __init__(self, mail: MimeMessage) -> None:
        self.mail = mail

    def __contains__(self, name: str) -> bool:
        return name in self.mail

    def as_bytes(self, policy: Policy) -> bytes:
        data = self.mail.as_bytes(policy=policy if getattr(policy, "utf8", False) else _WIRE_POLICY)
        # smtpproto puts the final "." right after the data, which must end a line to end it
        # (RFC 5321 4.1.1.4); a body's last line need not end with a line break.
        return data if data.endswith(b"\r\n") else data + b"\r\n"


class _Session:
    """One SMTP connection, used by one task at a time.

    `reusable` is False as soon as a command did not complete (an I/O error, a cancellation) or
    the protocol left the idle state: such a session is closed, never returned to the pool.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.protocol = SMTPClientProtocol()
        self.idle_since = 0.0
        self._broken = False

    @property
    def reusable(self) -> bool:
        return not self._broken and self.protocol.state in (ClientState.ready, ClientState.authenticated)

    def looks_alive(self) -> bool:
        """An idle session has nothing to read: readable means EOF or a parting 421 is waiting."""
        stream = self.stream.transport_stream if isinstance(self.stream, trio.SSLStream) else self.stream
        assert isinstance(stream, trio.SocketStream)
        try:
            readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    async def command(self, build: Callable[..., None], *args: Any, **kwargs: Any) -> SMTPResponse:
        """Send one command built by the state machine and return its positive reply; an error
        reply raises `_Reply` and leaves the session usable."""
        self._broken = True  # until the reply is in: an interruption leaves the session unusable
        try:
            build(*args, **kwargs)
        except SMTPException as exc:
            # Raised locally before anything was sent (an address the server cannot take).
            raise PermanentDeliveryError(f"SMTP: {exc}") from exc
        await self.stream.send_all(self.protocol.get_outgoing_data())
        reply = await self.read_reply()
        self._broken = False
        return reply

    async def read_reply(self) -> SMTPResponse:
        while True:
            data = await self.stream.receive_some()
            if not data:
                raise _ConnectionLost("the server closed the connection")
            try:
                reply = self.protocol.feed_bytes(bytes(data))
            except SMTPProtocolViolation as exc:
                match = _UNEXPECTED_REPLY.match(str(exc))
                if match:
                    raise _Reply(int(match[1]), match[2]) from None
                raise _ConnectionLost(f"protocol error: {exc}") from None
            except UnicodeDecodeError:
                raise _ConnectionLost("protocol error: non-ASCII reply") from None
            if reply is not None:
                if reply.is_error():
                    raise _Reply(reply.code, reply.message)
                return reply
            # The state machine may queue a command of its own (HELO after EHLO was refused).
            outgoing = self.protocol.get_outgoing_data()
            if outgoing:
                await self.stream.send_all(outgoing)

    async def start_tls(self, context: ssl.SSLContext, hostname: str) -> None:
        self.stream = trio.SSLStream(self.stream, context, server_hostname=hostname)
        try:
            await self.stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise TransientDeliveryError(f"SMTP TLS handshake failed: {_describe(exc)}") from exc

    async def reset(self) -> None:
        """RSET after a refused transaction so the session can carry the next message; if that
        fails the session is merely dropped (the caller reports the original refusal)."""
        if self.protocol.state in (ClientState.mailtx, ClientState.recipient_sent):
            try:
                await self.command(self.protocol.reset)
            except (_Reply, _ConnectionLost, DeliveryError, *_IO_ERRORS):
                self._broken = True

    async def quit(self) -> None:
        """Say goodbye politely if the server answers quickly; close the socket in any case."""
        try:
            with trio.move_on_after(_QUIT_TIMEOUT_SECONDS):
                if self.reusable:
                    await self.command(self.protocol.quit)
        except (_Reply, _ConnectionLost, DeliveryError, *_IO_ERRORS):
            pass
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._broken = True
        await trio.aclose_forcefully(self.stream)


class SmtpProvider:
    """Sends `EmailContent` to one address per call over persistent SMTP connections.

    A sender takes an idle connection (or opens one when none is idle), runs one mail transaction
    on it and puts it back; at most `settings.pool_size` idle connections are kept. There is no
    wait for a connection here: the e-mail channel's `concurrency` bounds the connections in use,
    and a wait inside the provider would be counted against the attempt's timeout. `ssl_context` verifies the server for
    `security = "starttls"` or `"tls"`; the default is the system's (`ssl.create_default_context()`).
    """

    name = "smtp"

    def __init__(self, settings: SmtpSettings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._settings = settings
        self._ssl_context = ssl_context if ssl_context is not None else ssl.create_default_context()
        # Most recently used last: it is taken first, so surplus connections age out at the bottom.
        self._idle: list[_Session] = []
        self._closed = False
        self._local_name = socket.gethostname() or "localhost"

    async def send(self, message: Message, address: str) -> str:
        """Deliver and return the message's Message-ID."""
        content = message.content
        if not isinstance(content, EmailContent):
            raise PermanentDeliveryError(f"SMTP: cannot send {message.channel} messages")
        mail = build_email(content, address)
        sender = _addr_spec(content.options.sender)
        recipients = list(dict.fromkeys(_addr_spec(r) for r in envelope_recipients(content, address)))
        try:
            session = await self._checkout()
            try:
                await self._transact(session, mail, sender, recipients, message.user_id)
            finally:
                await self._checkin(session)
        except _Reply as reply:
            raise _classify(reply) from None
        except (_ConnectionLost, *_IO_ERRORS) as exc:
            raise TransientDeliveryError(f"SMTP connection lost: {_describe(exc)}") from exc
        return str(mail["Message-ID"])

    async def aclose(self) -> None:
        """QUIT every idle connection (best effort); connections in use close when returned."""
        self._closed = True
        idle, self._idle = self._idle, []
        async with trio.open_nursery() as nursery:
            for session in idle:
                nursery.start_soon(session.quit)

    async def _transact(
        self, session: _Session, mail: MimeMessage, sender: str, recipients: list[str], user_id: str
    ) -> None:
        protocol = session.protocol
        primary = recipients[0]
        smtputf8 = not all(part.isascii() for part in (sender, *recipients))
        try:
            await session.command(protocol.mail, sender, smtputf8=smtputf8)
            for recipient in recipients:
                try:
                    await session.command(protocol.recipient, recipient)
                except _Reply as reply:
                    if recipient == primary:
                        raise
                    # Failing here would make the retry deliver to the primary again.
                    log.warning("SMTP server refused cc/bcc recipient %s of user %s: %s", recipient, user_id, reply)
            await session.command(protocol.start_data)
        except (_Reply, DeliveryError):
            await session.reset()
            raise
        try:
            await session.command(protocol.data, _Wire(mail))
        except (_ConnectionLost, *_IO_ERRORS) as exc:
            # The server may have queued the message before the connection went.
            raise TransientDeliveryError(
                f"SMTP connection lost after the message was sent: {_describe(exc)}", ambiguous=True
            ) from exc

    async def _checkout(self) -> _Session:
        now = trio.current_time()
        while self._idle:
            session = self._idle.pop()
            if now - session.idle_since < _MAX_IDLE_SECONDS and session.looks_alive():
                return session
            await session.aclose()
        return await self._connect()

    async def _checkin(self, session: _Session) -> None:
        if self._closed or not session.reusable or len(self._idle) >= self._settings.pool_size:
            await session.aclose()
            return
        session.idle_since = trio.current_time()
        self._idle.append(session)

    async def _connect(self) -> _Session:
        settings = self._settings
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(settings.host, settings.port)
        except OSError as exc:
            raise TransientDeliveryError(f"SMTP connection failed: {_describe(exc)}") from exc
        session = _Session(stream)
        try:
            if settings.security == "tls":
                await session.start_tls(self._ssl_context, settings.host)
            await session.read_reply()  # the greeting
            await session.command(session.protocol.send_greeting, self._local_name)
            if settings.security == "starttls":
                if "STARTTLS" not in session.protocol.extensions:
                    raise PermanentDeliveryError("SMTP: the server does not offer STARTTLS (security = starttls)")
                await session.command(session.protocol.start_tls)
                await session.start_tls(self._ssl_context, settings.host)
                await session.command(session.protocol.send_greeting, self._local_name)
            if settings.username:
                await self._authenticate(session)
        except BaseException:
            await session.aclose()
            raise
        return session

    async def _authenticate(self, session: _Session) -> None:
        protocol = session.protocol
        username = self._settings.username
        password = self._settings.password.get_secret_value()
        if "PLAIN" in protocol.auth_mechanisms:
            secret = f"\0{username}\0{password}".encode()
            await session.command(protocol.authenticate, "PLAIN", _b64(secret))
        elif "LOGIN" in protocol.auth_mechanisms:
            await session.command(protocol.authenticate, "LOGIN")
            await session.command(protocol.send_authentication_data, _b64(username.encode()))
            await session.command(protocol.send_authentication_data, _b64(password.encode()))
        else:
            offered = " ".join(sorted(protocol.auth_mechanisms)) or "none"
            raise PermanentDeliveryError(f"SMTP: no supported AUTH mechanism (server offers: {offered})")


def _classify(reply: _Reply) -> DeliveryError:
    reason = f"SMTP {reply.code}: {reply.text}"
    if 400 <= reply.code < 500:
        # 421 closes the session ("try again later"): slow the channel down, not just this message.
        return TransientDeliveryError(reason, throttled=reply.code == 421)
    if reply.code >= 500:
        return PermanentDeliveryError(reason)
    return TransientDeliveryError(f"SMTP protocol error: unexpected reply {reply.code} {reply.text}")


def _addr_spec(address: str) -> str:
    """The bare address the envelope needs ("Ann <a@x.org>" -> "a@x.org")."""
    return parseaddr(address)[1] or address


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _describe(exc: BaseException) -> str:
    # trio wraps socket and TLS errors in BrokenResourceError; the cause says what happened.
    cause = exc.__cause__
    text = str(exc)
    if cause is not None and (not text or isinstance(exc, trio.BrokenResourceError)):
        text = str(cause) or type(cause).__name__
    return text or type(exc).__name__
