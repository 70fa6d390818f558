"""A fake SMTP server (an aiosmtpd sink) that records what it receives and misbehaves on request.

aiosmtpd runs its own asyncio loop in a thread of its own (`aiosmtpd.controller.Controller`), so
the sink works the same next to a Trio test, a Trio load-test harness or plain threads; it is the
one place in the package where asyncio runs, and only inside that thread. Everything the sink
records or is told to do goes through a lock.

    with SmtpSink() as sink:
        settings = {"host": sink.host, "port": sink.port, "security": "none"}
        ...
        assert sink.received[0].rcpt_tos == ("ann@example.com",)

Per message, after the data, the sink answers according to `faults.next_outcome()`: "ok" 250
(recorded), "transient" 451, "permanent" 554, "throttle" 421 and the connection is closed,
"stall" never answers. `faults.latency` delays each answer to the data. `reject`, `defer_next`,
`drop_after` and `hang_up_next` script the common failures by name.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import socket
import ssl
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from .faults import Faults

_STALL_SECONDS = 24 * 3600.0
_ACCEPTED = "250 2.0.0 OK: queued"


@dataclass(frozen=True, slots=True)
class ReceivedMail:
    """One accepted message: the envelope, the raw data and how the session was set up."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool
    login: str | None

    def message(self) -> EmailMessage:
        """The data parsed by the stdlib `email` package."""
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class SmtpSink:
    """An SMTP server on 127.0.0.1 and a free port, started by `start()` or `with`.

    `starttls_context` offers (and requires) STARTTLS; `tls_context` makes the port implicit TLS.
    `credentials` = (username, password) requires AUTH (PLAIN or LOGIN) with exactly those
    before MAIL, offered only after STARTTLS when STARTTLS is configured.
    `received` lists accepted messages in order (`record_data=False` keeps them without their
    data, for long load tests); `connections` and `closed` count client connections opened and
    ended.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        starttls_context: ssl.SSLContext | None = None,
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        record_data: bool = True,
    ) -> None:
        self.faults = faults if faults is not None else Faults()
        self.received: list[ReceivedMail] = []
        self.connections = 0
        self.closed = 0
        self.port = 0
        self._starttls_context = starttls_context
        self._tls_context = tls_context
        self._credentials = credentials
        self._record_data = record_data
        self._lock = threading.Lock()
        self._closed_changed = threading.Condition(self._lock)
        self._rejected: set[str] = set()
        self._drop_countdown: int | None = None
        self._hang_ups = 0
        self._random = random.Random(self.faults.seed)
        self._controller: _Controller | None = None

    # -- instructions -------------------------------------------------------------------------

    def reject(self, *addresses: str) -> None:
        """Answer `550 5.1.1` to RCPT TO for these addresses (case-insensitive) from now on."""
        with self._lock:
            self._rejected.update(address.lower() for address in addresses)

    def defer_next(self, count: int) -> None:
        """Answer `451` to the data of the next `count` messages (nothing is recorded)."""
        with self._lock:
            self.faults.script.extend(["transient"] * count)

    def drop_after(self, count: int) -> None:
        """Close the connection right after the 250 of the `count`-th message accepted from now
        (once): the message is delivered, the client finds its connection gone."""
        with self._lock:
            self._drop_countdown = count

    def hang_up_next(self, count: int) -> None:
        """Close the connection instead of answering the data of the next `count` messages (a
        server that crashed before committing them: nothing is recorded)."""
        with self._lock:
            self._hang_ups += count

    # -- observations -------------------------------------------------------------------------

    def messages(self) -> list[ReceivedMail]:
        """A snapshot of `received`."""
        with self._lock:
            return list(self.received)

    def wait_closed(self, count: int, timeout: float) -> bool:
        """Block until `closed` reaches `count` (False on timeout). From Trio:
        `await trio.to_thread.run_sync(sink.wait_closed, 1, 5.0)`."""
        with self._closed_changed:
            return self._closed_changed.wait_for(lambda: self.closed >= count, timeout)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        # Controller(port=0) cannot report the port it got: reserve a free one first.
        with socket.socket() as probe:
            probe.bind((self.host, 0))
            self.port = probe.getsockname()[1]
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "server_hostname": "sink.invalid",
            "ssl_context": self._tls_context,
        }
        if self._starttls_context is not None:
            kwargs.update(tls_context=self._starttls_context, require_starttls=True)
        if self._credentials is not None:
            # AUTH is required in handle_MAIL: aiosmtpd's own auth_required also wants TLS.
            kwargs.update(authenticator=self._authenticate, auth_require_tls=self._starttls_context is not None)
        self._controller = _Controller(self, _Handler(self), **kwargs)
        self._controller.start()
        # The controller's own readiness probe is not a client: forget it once it is gone.
        self.wait_closed(1, self._controller.ready_timeout)
        with self._lock:
            self.connections = self.closed = 0

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- called from the server thread --------------------------------------------------------

    def _connection_opened(self) -> None:
        with self._lock:
            self.connections += 1

    def _connection_closed(self) -> None:
        with self._closed_changed:
            self.closed += 1
            self._closed_changed.notify_all()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self._credentials is not None:
            given = (auth_data.login.decode(errors="replace"), auth_data.password.decode(errors="replace"))
            if given == self._credentials:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    def _is_rejected(self, address: str) -> bool:
        with self._lock:
            return address.lower() in self._rejected

    def _decide(self) -> tuple[str | None, bool, float]:
        """(reply, or None to hang up; close the connection after it; delay) for one message's
        data. A 250 is only a plan here: `_accept` records the message once the delay is over."""
        with self._lock:
            if self._hang_ups > 0:
                self._hang_ups -= 1
                return None, True, 0.0
            outcome = self.faults.next_outcome()
            latency = self.faults.latency
            delay = self._random.uniform(*latency) if isinstance(latency, tuple) else latency
            if outcome == "stall":
                return "", False, _STALL_SECONDS
            if outcome == "transient":
                return "451 4.3.0 Temporary failure, try again later", False, delay
            if outcome == "permanent":
                return "554 5.6.0 Message rejected", False, delay
            if outcome == "throttle":
                return "421 4.7.0 Too many messages, slow down", True, delay
            return _ACCEPTED, False, delay

    def _accept(self, envelope: Envelope, session: Session) -> bool:
        """Record an accepted message; True when the connection is to be dropped after it."""
        with self._lock:
            auth = session.auth_data
            login = auth.login.decode(errors="replace") if isinstance(auth, LoginPassword) else None
            data = (envelope.original_content or b"") if self._record_data else b""
            self.received.append(
                ReceivedMail(
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=bytes(data),
                    tls=session.ssl is not None or self._tls_context is not None,
                    login=login,
                )
            )
            drop = False
            if self._drop_countdown is not None:
                self._drop_countdown -= 1
                if self._drop_countdown <= 0:
                    self._drop_countdown, drop = None, True
            return drop


class _Handler:
    """aiosmtpd hooks, running in the sink's thread."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self._sink._credentials is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self._sink._is_rejected(address):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply, drop, delay = self._sink._decide()
        if delay > 0:
            # The sink's own loop (aiosmtpd is asyncio). A client that gives up meanwhile cancels
            # this handler: the message is then not recorded, as a real server would not commit it.
            await asyncio.sleep(delay)
        if reply == _ACCEPTED:
            drop = self._sink._accept(envelope, session)
        if reply is None:
            # Closed before the reply is written: aiosmtpd's write of it is then discarded.
            assert server.transport is not None
            server.transport.close()
            return "451 4.3.0 (never sent)"
        if drop:
            assert isinstance(server, _SinkSMTP)
            server.close_after_reply = True
        return reply


class _SinkSMTP(SMTP):
    """Closes the connection once the answer to the data is written, when told to."""

    close_after_reply = False

    async def smtp_DATA(self, arg: str) -> None:
        await super().smtp_DATA(arg)
        if self.close_after_reply and self.transport is not None:
            self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        assert isinstance(self.event_handler, _Handler)
        # asyncio closes the socket only after this returns: count the connection as closed once
        # the client can see it is.
        self.loop.call_soon(self.event_handler._sink._connection_closed)


class _Controller(Controller):
    def __init__(self, sink: SmtpSink, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        # aiosmtpd makes one SMTP instance per accepted connection.
        self._sink._connection_opened()
        return _SinkSMTP(self.handler, **self.SMTP_kwargs)
