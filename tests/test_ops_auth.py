"""Optional API keys: `/send` and `/send/...` need one when keys are configured; health routes
never do; `/-/metrics` only with `protect_metrics`; a bad keys file stops start-up."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from quart import g

from dispatcher import auth, open_dispatcher
from dispatcher.app import create_app
from dispatcher.errors import ConfigError
from dispatcher.settings import AuthSettings

SEND = {"channels": ["email"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "C"}
FILE_KEY = "s3cret-file-key"
ENV_KEY = "env-key-1"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(f"# reporting service\nreports:{sha(FILE_KEY)}\n\n{sha('anonymous-key').upper()}  # no name\n")
    return path


@asynccontextmanager
async def serving(make_settings: Callable[..., Any], **auth_section: Any) -> AsyncIterator[Any]:
    async with open_dispatcher(make_settings(auth=auth_section)) as d:
        app = create_app(d)

        @app.get("/send/whoami")  # stands for the job routes: it reads what auth left on the request
        async def whoami() -> Any:
            return {"apiKeyId": g.api_key_id}

        async with app.test_app() as test_app:
            yield test_app.test_client()


def _sent(outbox: Path) -> int:
    return len(list((outbox / "email").glob("*.eml"))) if (outbox / "email").exists() else 0


# --- loading


def test_keys_file_and_environment_keys_are_loaded_as_hashes(keys_file: Path) -> None:
    keys = auth.load_api_keys(AuthSettings(keys_file=str(keys_file), keys=f" {ENV_KEY} ,, other "))
    assert keys.enabled and len(keys) == 4
    assert keys.ids == ("reports", sha("anonymous-key")[:12], sha(ENV_KEY)[:12], sha("other")[:12])
    assert keys.authenticate(FILE_KEY) == "reports"
    assert keys.authenticate("anonymous-key") == sha("anonymous-key")[:12]
    assert keys.authenticate(ENV_KEY) == sha(ENV_KEY)[:12]
    assert keys.authenticate(sha(FILE_KEY)) is None  # the hash itself is not a key
    assert keys.authenticate("") is None and keys.authenticate(None) is None


def test_no_keys_means_authentication_is_off() -> None:
    assert not auth.load_api_keys(AuthSettings()).enabled


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = auth.load_api_keys(AuthSettings(keys="first,second,third"))
    assert keys.authenticate("first") == sha("first")[:12]
    # No early exit on the match: the time taken does not tell which key matched.
    assert len(compared) == 3 and all(a == bytes.fromhex(sha("first")) for a, _ in compared)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("not-a-hash\n", "line 1"),
        (f"ok:{sha('a')}\nbad name:{sha('b')}\n", "line 2"),
        (f"{sha('a')[:63]}\n", "line 1"),
    ],
)
def test_malformed_keys_file_is_a_configuration_error(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ConfigError, match="auth.keys_file") as error:
        auth.load_api_keys(AuthSettings(keys_file=str(path)))
    assert fragment in str(error.value)


async def test_missing_keys_file_stops_start_up_naming_the_key(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    async with open_dispatcher(make_settings(auth={"keys_file": str(tmp_path / "absent")})) as d:
        with pytest.raises(ConfigError, match=r"auth\.keys_file: cannot read .*absent"):
            create_app(d)


# --- over HTTP


async def test_send_without_a_key_is_401_in_the_error_shape_and_sends_nothing(
    make_settings: Callable[..., Any], database: Any, outbox: Path, keys_file: Path
) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "ada@example.com"})
    async with serving(make_settings, keys_file=str(keys_file)) as client:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"X-API-Key": "wrong"},
            {"Authorization": f"Basic {FILE_KEY}"},
            {"Authorization": "Bearer "},
        ):
            response = await client.post("/send", json=SEND, headers=headers)
            assert response.status_code == 401, headers
            body = await response.get_json()
            assert body["statusCode"] == 401 and body["error"] == "Unauthorized" and body["message"]
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.headers["X-Request-ID"]
        assert _sent(outbox) == 0


async def test_a_valid_key_in_either_header_is_accepted_and_its_id_exposed(
    make_settings: Callable[..., Any], database: Any, outbox: Path, keys_file: Path
) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "ada@example.com"})
    async with serving(make_settings, keys_file=str(keys_file), keys=ENV_KEY) as client:
        assert (
            await client.post("/send", json=SEND, headers={"Authorization": f"Bearer {FILE_KEY}"})
        ).status_code == 200
        assert (await client.post("/send", json=SEND, headers={"X-API-Key": ENV_KEY})).status_code == 200
        assert _sent(outbox) == 2
        whoami = await client.get("/send/whoami", headers={"authorization": f"bearer {FILE_KEY}"})
        assert await whoami.get_json() == {"apiKeyId": "reports"}
        whoami = await client.get("/send/whoami", headers={"X-API-Key": ENV_KEY})
        assert await whoami.get_json() == {"apiKeyId": sha(ENV_KEY)[:12]}
        assert (await client.get("/send/whoami")).status_code == 401


async def test_health_and_docs_stay_open_metrics_only_when_asked(make_settings: Callable[..., Any]) -> None:
    async with serving(make_settings, keys=ENV_KEY) as client:
        for path in ("/-/healthz", "/-/ready", "/-/openapi.json", "/-/docs", "/-/metrics"):
            assert (await client.get(path)).status_code == 200, path
    async with serving(make_settings, keys=ENV_KEY, protect_metrics=True) as client:
        assert (await client.get("/-/healthz")).status_code == 200
        assert (await client.get("/-/metrics")).status_code == 401
        assert (await client.get("/-/metrics", headers={"X-API-Key": ENV_KEY})).status_code == 200


async def test_without_keys_sends_need_no_key(make_settings: Callable[..., Any], database: Any) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "ada@example.com"})
    async with serving(make_settings) as client:
        assert (await client.post("/send", json=SEND)).status_code == 200
        assert await (await client.get("/send/whoami")).get_json() == {"apiKeyId": None}


async def test_an_idempotency_key_is_scoped_to_the_api_key_that_sent_it(
    make_settings: Callable[..., Any], database: Any, outbox: Path, keys_file: Path
) -> None:
    # Two clients that happen to choose the same Idempotency-Key must not collide: the second is
    # a new send (not the first one's replay, nor a 422 for a different body).
    database.users.insert_one({"_id": "u1", "emailAddress": "ada@example.com"})
    other = {**SEND, "messageContent": "another body"}
    async with serving(make_settings, keys_file=str(keys_file), keys=ENV_KEY) as client:
        first = await client.post("/send", json=SEND, headers={"X-API-Key": FILE_KEY, "Idempotency-Key": "k"})
        second = await client.post("/send", json=other, headers={"X-API-Key": ENV_KEY, "Idempotency-Key": "k"})
        replay = await client.post("/send", json=SEND, headers={"X-API-Key": FILE_KEY, "Idempotency-Key": "k"})
        assert (first.status_code, second.status_code, replay.status_code) == (200, 200, 200)
        ids = [(await r.get_json())["id"] for r in (first, second, replay)]
        assert ids[0] != ids[1] and ids[2] == ids[0]
        assert _sent(outbox) == 2
