"""The harness's bare HTTP/1.1 client against a real hypercorn server: keep-alive reuse, a server
that closes, answers it refuses to guess at, and a server that is gone."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from dispatcher.fakes import serve_asgi
from dispatcher.fakes.server import read_body
from dispatcher.loadtest.connection import Connection, ExchangeError


class Echo:
    """Answers the JSON it was sent, counting connections; `/close` asks the client to close,
    `/chunked` answers without a length."""

    def __init__(self) -> None:
        self.peers: set[Any] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.peers.add(tuple(scope["client"]))
        body = await read_body(receive)
        headers = [(b"content-type", b"application/json")]
        if scope["path"] == "/close":
            headers.append((b"connection", b"close"))
        if scope["path"] != "/chunked":
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _connection(nursery: trio.Nursery, app: Echo) -> Connection:
    url = urlsplit(await nursery.start(serve_asgi, app))
    return Connection(url.hostname or "127.0.0.1", url.port or 80, timeout=5.0)


async def test_keeps_the_connection_and_returns_status_and_body(nursery: trio.Nursery) -> None:
    app = Echo()
    conn = await _connection(nursery, app)
    for i in range(3):
        status, body = await conn.request("POST", "/send", {"n": i, "text": "é"})
        assert status == 201
        assert json.loads(body) == {"n": i, "text": "é"}
    assert len(app.peers) == 1
    conn.close()


async def test_reopens_after_the_server_asks_to_close(nursery: trio.Nursery) -> None:
    app = Echo()
    conn = await _connection(nursery, app)
    assert (await conn.request("POST", "/close", {"a": 1}))[0] == 201
    assert (await conn.request("POST", "/send", {"a": 2}))[0] == 201
    assert len(app.peers) == 2
    conn.close()


async def test_an_answer_without_length_is_an_error_not_a_guess(nursery: trio.Nursery) -> None:
    conn = await _connection(nursery, Echo())
    with pytest.raises(ExchangeError, match="transfer-encoding|content-length"):
        await conn.request("POST", "/chunked", {"a": 1})
    # The connection is usable again afterwards.
    assert (await conn.request("POST", "/send", {"a": 2}))[0] == 201
    conn.close()


async def test_a_refused_connection_is_an_exchange_error() -> None:
    from dispatcher.embedded_store import free_port

    conn = Connection("127.0.0.1", free_port(), timeout=5.0)
    with pytest.raises(ExchangeError, match="OSError|Connection"):
        await conn.request("GET", "/")
