"""The harness's HTTP client: one keep-alive HTTP/1.1 connection on a non-blocking socket, with
the request written and the answer parsed by hand (`encode_request`, `parse_head`, which the
stream's generator process, `open_loop.py`, uses too).

The harness shares two cores with the service it measures, so what it spends per request is taken
from the service: httpx cost ~0.9 ms of CPU per POST here, h11 alone ~0.35 ms, this ~0.15–0.2 ms
(`benchmarks/generator_cost.py`). The price is that it knows only what the harness needs: small
JSON bodies, answers with `Content-Length` (what hypercorn sends for Quart's JSON responses), no
chunked answers, redirects, TLS or proxies. Anything else is an `ExchangeError`, never a guess.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import trio

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 64 * 1024


class ExchangeError(Exception):
    """The exchange failed: refused, reset, timed out, or an answer this client does not parse."""


def encode_request(method: str, path: str, host: str, payload: Any = None) -> bytes:
    """One request as it goes on the wire, with `payload` (if any) as compact JSON."""
    body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    head = f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
    if payload is not None:
        head += "content-type: application/json\r\n"
    return head.encode("ascii") + b"\r\n" + body


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length, whether the server closes the connection after it) of an answer's
    head, its blank line excluded. Raises `ExchangeError` (or `ValueError` on a number that is
    none) for what this client does not take: anything but HTTP/1.x, no content-length, a
    transfer-encoding."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ExchangeError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(parts[1])
    length: int | None = None
    close = parts[0] == "HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            raise ExchangeError(f"transfer-encoding {value.strip()!r} is not supported by the load generator")
        elif name == "connection":
            close = value.strip().lower() == "close"
    if length is None:
        raise ExchangeError("answer without content-length")
    return status, length, close


def failure_message(exc: Exception) -> str:
    """What a failed exchange reports: an `ExchangeError`'s own words, else the error's type too."""
    if isinstance(exc, ExchangeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class Connection:
    """One persistent connection to `host:port`, opened on first use and re-opened after a failure
    or a `Connection: close`. One exchange at a time: the harness pools connections.

    The socket is a plain non-blocking one, waited on with `trio.lowlevel.wait_readable`/
    `wait_writable` only when it would block: Trio's `SocketStream` also yields to the scheduler
    after every send and receive that did not block. With the stream driver's changes this took a
    request at 100 req/s from 6.8 wake-ups of the loop to 2.9 (the timer, the answer's head, its
    body), but not measurably its CPU: at that rate each wake-up from idle costs ~0.2 ms of CPU
    in Trio, ~0.05 in a bare epoll loop (`benchmarks/generator_cost.py`, docs/benchmarks.md P),
    which is why the stream now goes from a process without Trio (`open_loop.py`)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._socket: socket.socket | None = None
        self._buffer = bytearray()
        self._host = f"{host}:{port}"

    async def request(self, method: str, path: str, payload: Any = None) -> tuple[int, bytes]:
        """(status, body) of one exchange; raises `ExchangeError` on any failure, after which the
        next request opens a new connection."""
        # A bare scope, not `trio.fail_after`: the context manager's generator costs more than
        # the rest of the exchange's bookkeeping.
        scope = trio.CancelScope(deadline=trio.current_time() + self.timeout)
        try:
            with scope:
                return await self._exchange(encode_request(method, path, self._host, payload))
            raise ExchangeError(f"no answer within {self.timeout:g}s")
        except ExchangeError:
            self.close()
            raise
        except (OSError, ValueError) as exc:
            self.close()
            raise ExchangeError(failure_message(exc)) from exc
        except BaseException:
            self.close()  # cancelled mid-exchange: the answer would be read as the next one's
            raise

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        if self._socket is None:
            self._socket = await self._connect()
        await self._send(self._socket, request)
        buffer = self._buffer
        while (end := buffer.find(HEAD_END)) < 0:
            if len(buffer) > MAX_HEAD:
                raise ExchangeError("answer head over 64 KiB")
            await self._fill()
        status, length, close = parse_head(bytes(buffer[:end]))
        del buffer[: end + 4]
        while len(buffer) < length:
            await self._fill()
        body = bytes(buffer[:length])
        del buffer[:length]
        if close:
            self.close()
        return status, body

    async def _connect(self) -> socket.socket:
        stream = await trio.open_tcp_stream(self.host, self.port)
        # Trio set it non-blocking with TCP_NODELAY; from here on this class waits on it itself.
        return socket.socket(fileno=stream.socket.detach())

    @staticmethod
    async def _send(sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)

    async def _fill(self) -> None:
        sock = self._socket
        assert sock is not None
        while True:
            try:
                data = sock.recv(65536)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
        if not data:
            raise ExchangeError("the server closed the connection before the answer ended")
        self._buffer += data

    def close(self) -> None:
        sock, self._socket = self._socket, None
        self._buffer = bytearray()
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()
