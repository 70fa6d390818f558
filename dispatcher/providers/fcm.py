"""Push notifications through Firebase Cloud Messaging, HTTP v1, natively on Trio.

firebase-admin's async sender is asyncio-only and its sync one starts threads per batch, so the
JSON is built and posted here over one shared `httpx.AsyncClient` (HTTP/2 when `h2` is installed:
FCM has no batch endpoint, one request per device token, and HTTP/2 multiplexes them). Only the
credentials come from google-auth: the service-account key is loaded once, and the blocking token
refresh runs in a worker thread, one at a time, with the token cached until shortly before expiry.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from dataclasses import dataclass
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import httpx
import trio
from google.oauth2 import service_account

from ..errors import ConfigError, PermanentDeliveryError, TransientDeliveryError
from ..messages import Message, PushContent
from ..sections import FcmSettings
from .base import may_have_arrived
from .retry_after import parse_retry_after


SCOPES = ["https://www.googleapis.com/auth/firebase.messaging"]
# Refresh this long before the token expires, so a token never dies between check and use.
REFRESH_MARGIN_SECONDS = 300.0
# Bounds one blocking token request, hence how long an abandoned refresh thread can linger.
TOKEN_REQUEST_TIMEOUT_SECONDS = 30.0
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# Error codes that no retry can fix: the token is gone or malformed, the message is invalid, the
# token belongs to another sender, or APNs/web push credentials of the project are wrong.
_PERMANENT_CODES = frozenset(
    {
        "UNREGISTERED",
        "INVALID_ARGUMENT",
        "SENDER_ID_MISMATCH",
        "THIRD_PARTY_AUTH_ERROR",
        "PERMISSION_DENIED",
        "NOT_FOUND",
    }
)
_THROTTLE_CODES = frozenset({"QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED"})


@dataclass(slots=True)
class _AccessToken:
    value: str
    refresh_at: float  # trio.current_time() after which a new token is fetched
    # Obtained because FCM rejected the previous token with a 401: if FCM rejects this one too,
    # refreshing again will not help.
    after_rejection: bool = False


class FcmProvider:
    """Sends each push to one device token with `POST /v1/projects/{project}/messages:send`.

    Safe for concurrent use by many tasks; construct it in synchronous code (it reads the key
    file, which raises `ConfigError` naming the key when missing or invalid) and close it with
    `aclose()`.
    """

    name = "fcm"

    def __init__(self, settings: FcmSettings, keepalive: int = 100) -> None:
        if not settings.project_id:
            raise ConfigError("providers.fcm.project_id: required by the fcm provider")
        if not settings.credentials_file:
            raise ConfigError(
                "providers.fcm.credentials_file: required by the fcm provider (or set GOOGLE_APPLICATION_CREDENTIALS)"
            )
        try:
            self._credentials = service_account.Credentials.from_service_account_file(
                settings.credentials_file, scopes=SCOPES
            )
        except (OSError, ValueError, KeyError) as exc:
            # ValueError covers malformed JSON, missing fields and an unparsable private key.
            raise ConfigError(
                f"providers.fcm.credentials_file: cannot load service-account key {settings.credentials_file!r}: {exc}"
            ) from None
        self._url = f"{settings.api_base_url.rstrip('/')}/v1/projects/{settings.project_id}/messages:send"
        self._auth_request = google.auth.transport.requests.Request()
        self._token: _AccessToken | None = None
        self._token_lock = trio.Lock()
        # FCM rejected the last token (401): the next one is its replacement.
        self._rejected = False
        self._client = httpx.AsyncClient(
            http2=importlib.util.find_spec("h2") is not None,
            # The sender's per-attempt deadline is the real timeout; this only stops a request
            # from outliving a caller that forgot one.
            timeout=httpx.Timeout(60.0, connect=10.0),
            # No pool cap: the push channel's `concurrency` is the limit. As many idle connections
            # as the channel may use, so concurrency above httpx's default keep-alive pool (20)
            # does not reconnect on every request over HTTP/1.1.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive),
        )

    async def send(self, message: Message, address: str) -> str | None:
        """Deliver and return FCM's message name (`projects/.../messages/...`)."""
        if not isinstance(message.content, PushContent):
            raise PermanentDeliveryError(f"FCM: cannot send {message.channel} content as a push")
        token = await self._access_token()
        try:
            response = await self._client.post(
                self._url,
                json={"message": build_message(message.content, address)},
                headers={"Authorization": f"Bearer {token.value}"},
            )
        except httpx.TransportError as exc:
            raise TransientDeliveryError(
                f"FCM connection error: {type(exc).__name__}", ambiguous=may_have_arrived(exc)
            ) from None
        if response.is_success:
            token.after_rejection = False
            try:
                name = response.json().get("name")
            except (ValueError, AttributeError):
                name = None
            return name if isinstance(name, str) else None
        if response.status_code == 401:
            self._reject(token)
        raise classify_error(response, token_rejected_twice=token.after_rejection)

    async def aclose(self) -> None:
        await self._client.aclose()
        self._auth_request.session.close()  # the token endpoint's pooled connection

    async def _access_token(self) -> _AccessToken:
        token = self._token
        if token is not None and trio.current_time() < token.refresh_at:
            return token
        async with self._token_lock:
            # Whoever held the lock before us may have refreshed already: one refresh per expiry
            # however many senders noticed it.
            token = self._token
            if token is not None and trio.current_time() < token.refresh_at:
                return token
            try:
                # Abandon on cancel: a per-attempt timeout must not wait for a stuck token
                # endpoint. The thread then ends within TOKEN_REQUEST_TIMEOUT_SECONDS; a concurrent
                # refresh of the same credentials meanwhile is harmless (both tokens are valid).
                value, lifetime = await trio.to_thread.run_sync(self._refresh, abandon_on_cancel=True)
            except google.auth.exceptions.GoogleAuthError as exc:
                raise TransientDeliveryError(f"FCM auth: {_auth_reason(exc)}") from None
            margin = min(REFRESH_MARGIN_SECONDS, lifetime / 2)
            self._token = _AccessToken(value, trio.current_time() + lifetime - margin, self._rejected)
            self._rejected = False
            return self._token

    def _reject(self, token: _AccessToken) -> None:
        # A 401 means FCM no longer accepts the token (revoked, or our clock is off): drop it so
        # the retry fetches a new one. Several senders failing with the same token drop it once.
        if self._token is token:
            self._token = None
            self._rejected = True

    def _refresh(self) -> tuple[str, float]:
        """Runs in a worker thread: fetch a token from the key's `token_uri` (blocking)."""

        def request(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", TOKEN_REQUEST_TIMEOUT_SECONDS)
            return self._auth_request(*args, **kwargs)

        self._credentials.refresh(request)
        expiry = self._credentials.expiry  # naive UTC, as google-auth keeps it
        lifetime = 3600.0
        if expiry is not None:
            now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            lifetime = max(0.0, (expiry - now).total_seconds())
        return str(self._credentials.token), lifetime


def build_message(content: PushContent, token: str) -> dict[str, Any]:
    """The FCM v1 `message` object for one device token; empty parts are left out.

    The subtitle exists only on iOS, so it goes to `apns.payload.aps.alert.subtitle`; the
    template's own `apns` object is merged over it (it wins on conflicts).
    """
    message: dict[str, Any] = {"token": token}
    notification = {key: value for key, value in (("title", content.title), ("body", content.body)) if value}
    if notification:
        message["notification"] = notification
    if content.data:
        message["data"] = content.data
    if content.android:
        message["android"] = content.android
    apns: dict[str, Any] = {}
    if content.subtitle:
        apns = {"payload": {"aps": {"alert": {"subtitle": content.subtitle}}}}
    apns = deep_merge(apns, content.apns or {})
    if apns:
        message["apns"] = apns
    return message


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursing where both hold an object; neither is modified."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def classify_error(
    response: httpx.Response, *, token_rejected_twice: bool = False
) -> PermanentDeliveryError | TransientDeliveryError:
    """Turn an FCM error answer into a delivery error whose reason names FCM's error code.

    A 401 is transient once: the caller dropped the token and the retry uses a fresh one. When a
    token fetched because of a 401 is rejected as well, the key itself is not accepted
    (`token_rejected_twice`) and retrying cannot help.
    """
    status = response.status_code
    code, text = _error_code(response)
    reason = f"FCM {code}: {text}" if text else f"FCM {code}"
    if status == 429 or code in _THROTTLE_CODES:
        return TransientDeliveryError(reason, retry_after=_retry_after(response), throttled=True)
    if status == 401:
        return PermanentDeliveryError(reason) if token_rejected_twice else TransientDeliveryError(reason)
    if code in _PERMANENT_CODES or 400 <= status < 500:
        return PermanentDeliveryError(reason)
    # UNAVAILABLE, INTERNAL, any 5xx, and anything unexpected (a proxy's 502 page).
    return TransientDeliveryError(reason, retry_after=_retry_after(response))


def _error_code(response: httpx.Response) -> tuple[str, str]:
    """FCM's own code (`details[].errorCode`), else the Google API status, else the HTTP status."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return str(response.status_code), response.reason_phrase
    text = str(error.get("message") or "")
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("@type") == _FCM_ERROR_TYPE and detail.get("errorCode"):
            return str(detail["errorCode"]), text
    return str(error.get("status") or response.status_code), text


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


def _auth_reason(exc: google.auth.exceptions.GoogleAuthError) -> str:
    # RefreshError carries (message, response body); the message alone is the readable part.
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
