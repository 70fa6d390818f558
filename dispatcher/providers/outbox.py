"""The default provider: each message becomes a file, so the service runs with no credentials.

E-mails are written as `.eml` (what the SMTP provider would send, Bcc kept in an
`X-Envelope-Bcc` header so nothing is lost), everything else as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import uuid
from pathlib import Path

import trio

from ..errors import ConfigError, PermanentDeliveryError
from ..messages import EmailContent, Message, PushContent, TextContent
from ..mime import build_email


class OutboxProvider:
    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # An outbox that cannot be written would fail every delivery as a provider bug: stop here.
        problem = self.unwritable()
        if problem:
            raise ConfigError(f"providers.outbox.dir: {problem}")

    def unwritable(self) -> str | None:
        """Why messages cannot be written into the outbox (None when they can): a real write,
        since permission bits say nothing to root or on read-only mounts."""
        # Nothing is created here: a directory still missing is judged by the nearest existing
        # folder above it, in which it will be created.
        existing = self.directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        folders = [existing]
        if existing == self.directory:
            folders += [p for p in self.directory.glob("*") if p.is_dir()]
        for folder in folders:
            try:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".writable-"):
                    pass
            except OSError as exc:
                return f"cannot write to {folder}: {(exc.strerror or str(exc)).lower()}"
        return None

    async def ready(self) -> bool:
        """For `/-/ready`."""
        return await trio.to_thread.run_sync(self.unwritable) is None

    async def send(self, message: Message, address: str) -> str:
        """Write the message and return its file name."""
        folder = self.directory / message.channel
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        content = message.content
        if isinstance(content, EmailContent):
            mail = build_email(content, address)
            if content.options.bcc:
                mail["X-Envelope-Bcc"] = ", ".join(content.options.bcc)
            path, payload = folder / f"{stem}.eml", bytes(mail)
        else:
            if not isinstance(content, (TextContent, PushContent)):
                raise PermanentDeliveryError(f"outbox: cannot write {message.channel} content")
            record = {
                "channel": message.channel,
                "userId": message.user_id,
                "to": address,
                **dataclasses.asdict(content),
            }
            path, payload = folder / f"{stem}.json", json.dumps(record, ensure_ascii=False, indent=2).encode()
        await trio.to_thread.run_sync(_write, path, payload)
        return path.name

    async def aclose(self) -> None:
        return None


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(payload)
    tmp.replace(path)  # readers never see half a message
