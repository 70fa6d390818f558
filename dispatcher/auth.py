"""Optional API keys for `/send` and `/send/...` (and `/-/metrics` with `[auth].protect_metrics`).

Keys come from `[auth].keys_file` (one SHA-256 hex digest of a key per line, optionally
`name:digest`, optionally followed by attributes; `#` starts a comment) and/or
`DISPATCHER_API_KEYS` (comma-separated plain keys, hashed when loaded). Only digests are kept in
memory. With no key configured, authentication is off. A client presents its key as
`Authorization: Bearer <key>` or `X-API-Key: <key>`.

Attributes, separated by spaces after the digest (a line without any reads as before):
- `admin`: the key sees and cancels every job, and the callbacks of every key;
- `callback_secret_env=NAME`: the environment variable holding this key's callback signing
  secret (`whsec_…`); the secret itself never sits in the file.

Each key has an id, its name or the first 12 hex digits of its digest, which is safe to log and
scopes what belongs to one client (idempotency keys, jobs, callbacks).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import ConfigError

_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LINE = re.compile(r"(?:(?P<name>[^:]*?)\s*:\s*)?(?P<digest>\S+)(?P<attributes>(?:\s+\S+)*)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def hash_key(key: str) -> str:
    """The SHA-256 hex digest written in a keys file: `printf %s KEY | sha256sum`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    digest: bytes  # raw SHA-256
    admin: bool = False
    # This key's callback signing secret (`whsec_…`), read from the environment at start-up.
    callback_secret: str | None = field(default=None, repr=False)


class ApiKeys:
    """The configured keys; `authenticate` checks a presented key against all of them."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = tuple(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key.id for key in self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, presented: str | None) -> str | None:
        """The id of the key `presented`, or None."""
        key = self.authenticate_key(presented)
        return key.id if key is not None else None

    def authenticate_key(self, presented: str | None) -> ApiKey | None:
        """The key `presented`, or None. Digests are compared with `hmac.compare_digest`, against
        every key (no early exit), so the time taken does not tell which digest, or how much of
        one, matched."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found

    def by_id(self, key_id: str | None) -> ApiKey | None:
        return next((key for key in self._keys if key.id == key_id), None) if key_id else None


def load_api_keys(settings: Any) -> ApiKeys:
    """Load the keys of `settings` (the whole `Settings` or its `AuthSettings`).

    Raises `ConfigError` naming `auth.keys_file` when the file is missing, unreadable or has a
    line that is not a digest. Call it at start-up so a bad file stops the service early.
    """
    auth = getattr(settings, "auth", settings)
    keys: list[ApiKey] = []
    if auth.keys_file:
        keys.extend(_read_keys_file(Path(auth.keys_file)))
    plain = auth.keys.get_secret_value()
    for key in (part.strip() for part in plain.split(",")):
        if key:
            digest = hash_key(key)
            keys.append(ApiKey(digest[:12], bytes.fromhex(digest)))
    return ApiKeys(keys)


def _read_keys_file(path: Path) -> list[ApiKey]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"auth.keys_file: cannot read {path}: {reason}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"auth.keys_file: {path} line {number}"
        match = _LINE.fullmatch(line)
        if match is None or not _DIGEST.fullmatch(match["digest"]):
            raise ConfigError(
                f"{where}: expected a SHA-256 hex digest (64 hex digits) or name:digest, then optional "
                "attributes (admin, callback_secret_env=NAME)"
            )
        name = match["name"]
        if name is not None and not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: a key name is 1-64 of A-Z a-z 0-9 . _ -")
        admin, secret = False, None
        for attribute in match["attributes"].split():
            label, equals, value = attribute.partition("=")
            if attribute == "admin":
                admin = True
            elif label == "callback_secret_env" and equals and _ENV_NAME.fullmatch(value):
                secret = os.environ.get(value, "")
                if not secret.startswith("whsec_"):
                    raise ConfigError(f"{where}: callback_secret_env: {value} must hold a secret whsec_<base64>")
            else:
                raise ConfigError(f"{where}: unknown attribute {attribute!r} (use admin or callback_secret_env=NAME)")
        digest = match["digest"].lower()
        keys.append(ApiKey(name if name is not None else digest[:12], bytes.fromhex(digest), admin, secret))
    return keys


class Headers(Protocol):
    """What `presented_key` reads of a request's headers (a mapping, or Werkzeug's `Headers`)."""

    def get(self, key: str) -> str | None: ...


def presented_key(headers: Headers) -> str | None:
    """The key of a request: `Authorization: Bearer <key>`, else `X-API-Key: <key>`."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    api_key = headers.get("X-API-Key")
    return api_key.strip() if api_key and api_key.strip() else None


def is_protected(path: str, protect_metrics: bool) -> bool:
    """`/send` and everything under it, `/saga/send`, `/callbacks…`; `/-/metrics` when asked. Health and docs
    stay open."""
    if path == "/send" or path.startswith("/send/") or path == "/saga/send":
        return True
    if path == "/callbacks" or path.startswith("/callbacks/"):
        return True
    return protect_metrics and path == "/-/metrics"


__all__ = ["ApiKey", "ApiKeys", "hash_key", "is_protected", "load_api_keys", "presented_key"]
