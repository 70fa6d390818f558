"""`POST /providers/twilio/status`, answered before Quart sees the request.

Twilio posts a receipt per status change of every message (two or more per SMS), at the rate of
the fan-outs that created them, and each one taken through Quart cost the service ~1.6 ms of CPU
(request and response objects, the hooks, the form parser) on the event loop the fan-outs share;
hypercorn with a bare ASGI app that reads the same POST and answers costs ~0.76 ms. So the ASGI
app (`app._App`) hands this route's ordinary requests — a form, its length given and within
`[server].max_body_bytes` — to `TwilioStatus` directly: the body is read and parsed with
`urllib.parse` as Quart would (`parse_qsl`, blank values kept: Twilio signs them), the signature
checked with the SDK's `RequestValidator` (`receipts.TwilioSignature`), and the receipt handed to
the same group commit. The answers, the `X-Request-ID` echo, the access log line and the metrics
are the Quart route's; anything else (another content type, a chunked or oversized body) still
goes through Quart's route, which answers it as before.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import cast
from urllib.parse import parse_qsl

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope

from .errors import StoreError
from .logs import request_id_from, request_id_var
from .ops import account
from .providers.twilio import DELIVERY_PARAM, STATUS_CALLBACK_PATH
from .receipts import BadReceipt, ReceiptKeeper, TwilioSignature, twilio_receipt
from .web import STORE_DOWN, error_body

log = logging.getLogger(__name__)

# The form types Quart parses as `parse_qsl` (its `FormDataParser`); multipart goes to Quart.
_FORM_TYPES = (b"application/x-www-form-urlencoded", b"application/x-url-encoded")
FORBIDDEN = "X-Twilio-Signature is missing or does not match"


async def answer(
    signature: TwilioSignature, keeper: ReceiptKeeper, query: str, form: Mapping[str, str], signed: str | None
) -> tuple[int, str]:
    """The status and error message (empty for 204) of one status callback: its query string,
    form and `X-Twilio-Signature`. Raises `StoreError` when the receipt cannot be written."""
    if not signature.valid(query, form, signed):
        return 403, FORBIDDEN
    delivery = next((value for name, value in parse_qsl(query, keep_blank_values=True) if name == DELIVERY_PARAM), None)
    try:
        receipt = twilio_receipt(form, delivery=delivery or None)
    except BadReceipt as exc:
        return 400, f"not a Twilio status callback: {exc}"
    if receipt is not None:
        await keeper.take([receipt])
    return 204, ""


class TwilioStatus:
    """The ASGI handler of the route's ordinary requests (see the module's docstring)."""

    def __init__(self, signature: TwilioSignature, keeper: ReceiptKeeper, max_body: int) -> None:
        self._signature = signature
        self._keeper = keeper
        self._max_body = max_body

    def takes(self, scope: HTTPScope) -> bool:
        """Whether this request is one for `__call__` (anything else: Quart's route)."""
        if scope["path"] != STATUS_CALLBACK_PATH or scope["method"] != "POST":
            return False
        length = kind = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                kind = value.partition(b";")[0].strip().lower()
            elif name == b"transfer-encoding":
                return False
        return kind in _FORM_TYPES and length is not None and length.isdigit() and int(length) <= self._max_body

    async def __call__(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        started = time.perf_counter()
        headers = dict(reversed(list(scope["headers"])))  # the first of each, as Quart's `headers.get`
        request_id = request_id_from(_text(headers.get(b"x-request-id")))
        token = request_id_var.set(request_id)
        try:
            chunks: list[bytes] = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(cast(bytes, message.get("body", b"")))
                if not message.get("more_body", False):
                    break
            try:
                form: dict[str, str] = {}
                for name, value in parse_qsl(b"".join(chunks).decode(), keep_blank_values=True):
                    form.setdefault(name, value)
            except ValueError:  # not UTF-8: Quart's parser gives an empty form, as here
                form = {}
            query = scope["query_string"].decode("latin-1")
            try:
                status, text = await answer(
                    self._signature, self._keeper, query, form, _text(headers.get(b"x-twilio-signature"))
                )
            except StoreError as exc:
                log.error("store unavailable: %s", exc)
                status, text = 503, STORE_DOWN
            except Exception as exc:
                log.error("unhandled error on POST %s", scope["path"], exc_info=exc)
                status, text = 500, "internal error; see the service log"
            body = b""
            reply = [(b"x-request-id", request_id.encode())]
            if status != 204:
                body = json.dumps(error_body(status, text)).encode()
                reply += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": reply})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            account("POST", scope["path"], STATUS_CALLBACK_PATH, status, started, None)
        finally:
            request_id_var.reset(token)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


__all__ = ["FORBIDDEN", "TwilioStatus", "answer"]
