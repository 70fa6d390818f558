"""A fake Files Service: `GET /download/{name}` answers a file's bytes and content type.

The name is taken from the RAW request path and percent-decoded exactly once, so what the fake
records is exactly the name the client meant: `..%2F..%2Fetc%2Fpasswd` is the one name
`../../etc/passwd`, never a path to resolve. Nothing here touches the local disk.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from .faults import Faults
from .server import respond

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Bodies go out in pieces so a client's streaming size cap is exercised as with a real server.
_CHUNK = 64 * 1024


class FakeFilesService:
    """A raw ASGI app; serve it with `url = await nursery.start(serve_asgi, fake)`.

    `files` maps a name to `(content, content_type)` and may be changed while serving.
    `received` lists every requested name (decoded) in arrival order, whatever the answer;
    `stray` lists the raw paths of requests that were not `GET /download/{one segment}`, so a
    test can tell that a client never wandered elsewhere on the service.

    Outcomes from `faults`: "ok" answers 200 (or 404 for an unknown name), "transient" 503,
    "throttle" 429 with `Retry-After`, "permanent" 500, "stall" never answers; the latency
    applies before every answer.
    """

    def __init__(self, files: Mapping[str, tuple[bytes, str]] | None = None, faults: Faults | None = None) -> None:
        self.files: dict[str, tuple[bytes, str]] = dict(files or {})
        self.faults = faults if faults is not None else Faults()
        self.received: list[str] = []
        self.stray: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        segments = raw_path.split(b"/")
        if len(segments) != 3 or segments[:2] != [b"", b"download"]:
            self.stray.append(raw_path.decode("latin-1"))
            await _error(send, 404, f"no route {raw_path.decode('latin-1')}")
            return
        if scope["method"] != "GET":
            self.stray.append(raw_path.decode("latin-1"))
            await _error(send, 405, f"method {scope['method']} not allowed")
            return
        try:
            name = unquote_to_bytes(segments[2]).decode("utf-8")
        except UnicodeDecodeError:
            self.stray.append(raw_path.decode("latin-1"))
            await _error(send, 400, "the file name is not UTF-8")
            return
        self.received.append(name)
        outcome = self.faults.next_outcome()
        await self.faults.wait(outcome)
        if outcome == "transient":
            await _error(send, 503, "service unavailable")
        elif outcome == "throttle":
            await _error(send, 429, "too many requests", [(b"retry-after", str(self.faults.retry_after).encode())])
        elif outcome == "permanent":
            await _error(send, 500, "internal error")
        elif name not in self.files:
            await _error(send, 404, f"no file {name!r}")
        else:
            content, content_type = self.files[name]
            await _send_file(send, content, content_type)


async def _send_file(send: Send, content: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(content)).encode()),
            ],
        }
    )
    for start in range(0, len(content), _CHUNK):
        await send({"type": "http.response.body", "body": content[start : start + _CHUNK], "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await respond(send, status, json.dumps({"statusCode": status, "message": message}).encode(), headers)


__all__ = ["FakeFilesService"]
