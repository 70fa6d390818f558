"""A fake FCM HTTP v1 API, the OAuth token endpoint in front of it, and service-account keys.

The pieces fit the real google-auth code path: `write_service_account_key` writes a key file whose
`token_uri` points at a `FakeOAuthToken`, which checks the signed JWT-bearer assertion the way
Google does and issues `fake-token-N`; `FakeFcm` accepts only those tokens. Typical set-up:

```python
tokens = FakeOAuthToken()
token_url = await nursery.start(serve_asgi, tokens)
key = write_service_account_key(tmp / "key.json", f"{token_url}/token", "demo")
tokens.trust(key)
fcm = FakeFcm("demo", tokens)
fcm_url = await nursery.start(serve_asgi, fcm)   # [providers.fcm].api_base_url
```
"""

from __future__ import annotations

import itertools
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio
from google.auth import exceptions as auth_exceptions
from google.auth import jwt

from .faults import Faults
from .server import read_body, respond

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth signs service-account assertions for this audience whatever the key's token_uri is.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_MESSAGE_FIELDS = frozenset(
    {
        "name",
        "token",
        "topic",
        "condition",
        "data",
        "notification",
        "android",
        "apns",
        "webpush",
        "fcm_options",
        "fcmOptions",
    }
)


@dataclass(frozen=True, slots=True)
class ServiceAccountKey:
    """A key file written by `write_service_account_key`, with what a fake needs to trust it."""

    path: Path
    project_id: str
    client_email: str
    private_key_id: str
    public_key_pem: str


def write_service_account_key(path: str | Path, token_uri: str, project_id: str) -> ServiceAccountKey:
    """Write a service-account JSON key with a fresh 2048-bit RSA key; tokens are requested from
    `token_uri`. Return the public half for `FakeOAuthToken.trust`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    key = ServiceAccountKey(
        Path(path),
        project_id,
        f"firebase-adminsdk-fake@{project_id}.iam.gserviceaccount.com",
        secrets.token_hex(20),
        public_pem,
    )
    document = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": key.private_key_id,
        "private_key": private_pem,
        "client_email": key.client_email,
        "client_id": str(secrets.randbelow(10**21)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    key.path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return key


@dataclass
class FakeOAuthToken:
    """Raw ASGI app for the OAuth 2.0 token endpoint (any path): the JWT-bearer grant only.

    The assertion must be signed by a trusted key (looked up by its `kid`), issued by that key's
    service account, addressed to Google's token audience and asking for the FCM scope. `faults`
    apply to well-formed requests: "permanent" answers 400 `invalid_grant`, "transient" 503,
    "throttle" 429, "stall" nothing. `issued` lists every token handed out, `received` the claims
    of every valid assertion; `revoke()` makes the tokens issued so far unacceptable to `FakeFcm`.
    """

    faults: Faults = field(default_factory=Faults)
    expires_in: int = 3600
    issued: list[str] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    _trusted: dict[str, ServiceAccountKey] = field(default_factory=dict, init=False, repr=False)
    _valid: set[str] = field(default_factory=set, init=False, repr=False)
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1), init=False, repr=False)

    def trust(self, key: ServiceAccountKey) -> None:
        self._trusted[key.private_key_id] = key

    def is_valid(self, token: str) -> bool:
        """Whether `token` was issued here and not revoked."""
        return token in self._valid

    def revoke(self) -> None:
        self._valid.clear()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        if scope["method"] != "POST":
            await _oauth_error(send, 405, "invalid_request", "Method not allowed")
            return
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        if form.get("grant_type") != JWT_BEARER_GRANT:
            await _oauth_error(send, 400, "unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
            return
        claims, problem = self._verify(form.get("assertion", ""))
        if claims is None:
            await _oauth_error(send, 400, "invalid_grant", problem)
            return
        outcome = self.faults.next_outcome()
        await self.faults.wait(outcome)
        if outcome == "permanent":
            await _oauth_error(send, 400, "invalid_grant", "Invalid JWT Signature.")
        elif outcome == "transient":
            await _oauth_error(send, 503, "internal_failure", "Backend Error")
        elif outcome == "throttle":
            await _oauth_error(
                send,
                429,
                "rate_limit_exceeded",
                "Rate Limit Exceeded",
                [(b"retry-after", f"{self.faults.retry_after:g}".encode())],
            )
        else:
            token = f"fake-token-{next(self._counter)}"
            self.received.append(claims)
            self.issued.append(token)
            self._valid.add(token)
            await respond(
                send,
                200,
                json.dumps({"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}).encode(),
            )

    def _verify(self, assertion: str) -> tuple[dict[str, Any] | None, str]:
        try:
            header = jwt.decode_header(assertion)
            key = self._trusted.get(str(header.get("kid")))
            if key is None:
                return None, "Invalid grant: account not found"
            claims = jwt.decode(
                assertion,
                certs={key.private_key_id: key.public_key_pem},
                audience=GOOGLE_TOKEN_AUDIENCE,
                clock_skew_in_seconds=10,
            )
        except (ValueError, auth_exceptions.GoogleAuthError) as exc:
            return None, f"Invalid JWT: {exc}"
        if claims.get("iss") != key.client_email:
            return None, "Invalid JWT: issuer is not the key's service account"
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return None, "Invalid JWT: the FCM scope was not requested"
        return claims, ""


@dataclass(frozen=True, slots=True)
class FcmRequest:
    """One request as the fake saw it. `outcome` is the fault applied ("ok", "permanent",
    "transient", "throttle", "stall"), "unregistered" for a gone device token, or why it was
    refused ("unauthenticated", "not_found", "invalid")."""

    path: str
    message: dict[str, Any]
    authorization: str
    time: float  # trio.current_time() on arrival
    outcome: str
    name: str | None = None

    @property
    def token(self) -> str | None:
        token = self.message.get("token")
        return token if isinstance(token, str) else None


@dataclass
class FakeFcm:
    """Raw ASGI app for `POST /v1/projects/{project_id}/messages:send`.

    `auth` is the `FakeOAuthToken` whose tokens are accepted (or any `token -> bool`). Device
    tokens starting with "gone-", or absent from `valid_tokens` when that is a set, are answered
    404 UNREGISTERED. Otherwise `faults` decide: "permanent" 400 INVALID_ARGUMENT, "transient"
    503 UNAVAILABLE, "throttle" 429 QUOTA_EXCEEDED with `Retry-After`, "stall" no answer.
    `received` holds the requests answered 200, `attempts` every request that arrived.
    """

    project_id: str
    auth: FakeOAuthToken | Callable[[str], bool]
    valid_tokens: set[str] | None = None
    faults: Faults = field(default_factory=Faults)
    received: list[FcmRequest] = field(default_factory=list)
    attempts: list[FcmRequest] = field(default_factory=list)

    def attempts_to(self, token: str) -> list[FcmRequest]:
        """Every request addressed to device `token`."""
        return [request for request in self.attempts if request.token == token]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path = scope["path"]
        body = await read_body(receive)
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        now = trio.current_time()
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        message = payload.get("message") if isinstance(payload, dict) else None
        message = message if isinstance(message, dict) else {}

        def record(outcome: str, name: str | None = None) -> FcmRequest:
            request = FcmRequest(path, message, authorization, now, outcome, name)
            self.attempts.append(request)
            return request

        if path != f"/v1/projects/{self.project_id}/messages:send":
            record("not_found")
            status = 403 if path.endswith("/messages:send") else 404
            await _fcm_error(
                send,
                status,
                "PERMISSION_DENIED" if status == 403 else "NOT_FOUND",
                f"Permission denied or unknown resource {path}",
            )
            return
        if scope["method"] != "POST":
            record("not_found")
            await _fcm_error(send, 405, "INVALID_ARGUMENT", "Method not allowed")
            return
        if not self._authenticated(authorization):
            record("unauthenticated")
            await _fcm_error(
                send,
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. "
                "Expected OAuth 2 access token, login cookie or other valid authentication credential.",
            )
            return
        problem = _validate(payload)
        if problem is not None:
            record("invalid")
            await _fcm_error(send, 400, "INVALID_ARGUMENT", problem, fcm_code="INVALID_ARGUMENT")
            return

        token = message["token"]
        if token.startswith("gone-") or (self.valid_tokens is not None and token not in self.valid_tokens):
            record("unregistered")
            await _fcm_error(send, 404, "NOT_FOUND", "Requested entity was not found.", fcm_code="UNREGISTERED")
            return
        outcome = self.faults.next_outcome()
        name = f"projects/{self.project_id}/messages/0:{uuid.uuid4().hex}" if outcome == "ok" else None
        request = record(outcome, name)
        await self.faults.wait(outcome)  # a stall never returns from here
        if outcome == "permanent":
            await _fcm_error(
                send,
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                fcm_code="INVALID_ARGUMENT",
            )
        elif outcome == "transient":
            await _fcm_error(send, 503, "UNAVAILABLE", "The service is currently unavailable.", fcm_code="UNAVAILABLE")
        elif outcome == "throttle":
            await _fcm_error(
                send,
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for quota metric 'Send requests'.",
                fcm_code="QUOTA_EXCEEDED",
                headers=[(b"retry-after", f"{self.faults.retry_after:g}".encode())],
            )
        else:
            self.received.append(request)
            await respond(send, 200, json.dumps({"name": name}).encode())

    def _authenticated(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        check = self.auth.is_valid if isinstance(self.auth, FakeOAuthToken) else self.auth
        return check(token)


def _validate(payload: Any) -> str | None:
    """FCM's complaint about a malformed send body, or None."""
    if not isinstance(payload, dict) or not isinstance(payload.get("message"), dict):
        return "Invalid JSON payload received. Expected an object with a 'message' field."
    message = payload["message"]
    unknown = sorted(set(message) - _MESSAGE_FIELDS)
    if unknown:
        return f"Invalid JSON payload received. Unknown name \"{unknown[0]}\" at 'message': Cannot find field."
    token = message.get("token")
    if not isinstance(token, str) or not token:
        return "Recipient of the message is not set."
    data = message.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(value, str) for value in data.values()):
        return "Invalid value at 'message.data': data values must be strings."
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or not all(
        isinstance(notification.get(key, ""), str) for key in ("title", "body", "image")
    ):
        return "Invalid value at 'message.notification'."
    for part in ("android", "apns", "webpush"):
        if not isinstance(message.get(part, {}), dict):
            return f"Invalid value at 'message.{part}': expected an object."
    return None


async def _fcm_error(
    send: Send,
    status: int,
    google_status: str,
    message: str,
    *,
    fcm_code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    error: dict[str, Any] = {"code": status, "message": message, "status": google_status}
    if fcm_code is not None:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": fcm_code}]
    await respond(send, status, json.dumps({"error": error}).encode(), headers)


async def _oauth_error(
    send: Send, status: int, error: str, description: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await respond(send, status, json.dumps({"error": error, "error_description": description}).encode(), headers)


__all__ = ["FakeFcm", "FakeOAuthToken", "FcmRequest", "ServiceAccountKey", "write_service_account_key"]
