"""Attachments from the Files Service: `GET {url}/download/{name}`, streamed under a size cap.

Nothing is ever read from the local disk on a request's behalf: a name is only ever one URL path
segment on the Files Service.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote

import httpx

from .errors import RequestError, UpstreamError
from .messages import Attachment
from .settings import FilesSettings


class FilesClient:
    def __init__(self, settings: FilesSettings, client: httpx.AsyncClient) -> None:
        self._base = settings.url.rstrip("/")
        self._max_bytes = settings.max_attachment_bytes
        self._client = client

    async def fetch_all(self, names: Sequence[str]) -> tuple[Attachment, ...]:
        """Fetch each distinct name once; the cap applies to their total (one e-mail carries all)."""
        budget = self._max_bytes
        attachments = []
        for name in dict.fromkeys(names):
            # httpx normalises "." and ".." segments away: they would leave the download route.
            if name in ("", ".", ".."):
                raise RequestError(f"emailAttachments: {name!r} is not a file name")
            attachment = await self._fetch(name, budget)
            budget -= len(attachment.content)
            attachments.append(attachment)
        return tuple(attachments)

    async def _fetch(self, name: str, budget: int) -> Attachment:
        url = f"{self._base}/download/{quote(name, safe='')}"
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code == 404:
                    raise RequestError(f"emailAttachments: the Files Service has no file {name!r}")
                if response.status_code >= 500 or response.status_code in (408, 429):
                    raise UpstreamError(f"Files Service answered {response.status_code} for {name!r}")
                if response.status_code != 200:
                    raise RequestError(f"emailAttachments: the Files Service refused {name!r} ({response.status_code})")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > budget:
                        raise RequestError(
                            f"emailAttachments: attachments exceed {self._max_bytes} bytes (at {name!r})"
                        )
                    chunks.append(chunk)
                content_type = response.headers.get("content-type", "application/octet-stream")
        except httpx.HTTPError as exc:
            raise UpstreamError(f"Files Service unreachable: {type(exc).__name__}") from None
        return Attachment(name.rsplit("/", 1)[-1], content_type.split(";")[0].strip(), b"".join(chunks))
