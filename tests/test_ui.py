"""The operations page over HTTP (the browser tests drive it in Chromium): what it shows, that it
escapes what it shows, its headers, its relative links, its key prompt and its settings."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from dispatcher import ConfigError, open_dispatcher, settings_from_dict
from dispatcher.auth import hash_key
from dispatcher.app import create_app
from dispatcher.ui.chart import deliveries_chart
from dispatcher.ui.progress import channel_progress

HOSTILE = '<script>alert("x")</script>'


@asynccontextmanager
async def client_for(make_settings: Callable[..., Any], **sections: Any) -> AsyncIterator[Any]:
    async with open_dispatcher(make_settings(**sections)) as d:
        async with create_app(d).test_app() as app:
            yield app.test_client()


async def send(client: Any, recipients: list[str], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """An asynchronous send, followed until it is done; its status."""
    body = {"channels": ["email"], "recipients": recipients, "messageTitle": "T", "messageContent": "Hi"}
    response = await client.post("/send?async=true", json=body, headers=headers or {})
    assert response.status_code == 202
    job_id = (await response.get_json())["id"]
    while True:
        status = await (await client.get(f"/send/{job_id}", headers=headers or {})).get_json()
        if status["status"] == "done":
            return status
        await trio.sleep(0.02)


async def page(client: Any, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    response = await client.get(path, headers=headers or {})
    return response.status_code, (await response.get_data()).decode(), response.headers


def relative_only(html: str) -> None:
    """Every link, script, style sheet and form target is relative: a path-prefix proxy keeps working."""
    targets = re.findall(r'(?:href|src|action|data-cancel|data-retry)="([^"]*)"', html)
    assert targets
    absolute = [t for t in targets if t.startswith(("/", "http:", "https:", "//"))]
    assert absolute == []


async def test_jobs_list_and_job_page_show_a_send_and_escape_what_it_carries(make_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    async with client_for(make_settings) as client:
        job_id = (await send(client, ["u1", HOSTILE]))["id"]
        status, html, headers = await page(client, "/-/ui/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert re.findall(r'<tr data-job="([0-9a-f]+)"', html) == [job_id]
        assert 'aria-label="email: 1 sent, 1 failed of 2"' in html
        relative_only(html)

        status, html, _ = await page(client, f"/-/ui/jobs/{job_id}")
        assert status == 200 and f"<code>{job_id}</code>" in html
        assert HOSTILE not in html
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html  # the failed recipient, escaped
        relative_only(html)
        assert 'data-cancel="../../../send/' not in html  # a finished send has nothing to cancel
        assert '<figure class="chart">' in html and "2 deliveries over" in html  # timed by the ledger

        status, html, _ = await page(client, f"/-/ui/jobs/{job_id}?user=u1")
        assert re.search(
            r"<th scope=\"row\">email</th><td><span class=\"state state-sent\">sent</span></td><td>1</td>", html
        )
        status, html, _ = await page(client, f"/-/ui/jobs/{job_id}?user=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
        assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


async def test_filters_and_paging(make_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    async with client_for(make_settings) as client:
        ids = [(await send(client, ["u1"]))["id"] for _ in range(5)]
        _, html, _ = await page(client, "/-/ui/?limit=2")
        assert re.findall(r'<tr data-job="([0-9a-f]+)"', html) == ids[::-1][:2]
        older = re.search(r'<a rel="next" href="\./\?([^"]+)"', html).group(1).replace("&amp;", "&")
        _, html, _ = await page(client, f"/-/ui/?{older}")
        assert re.findall(r'<tr data-job="([0-9a-f]+)"', html) == ids[::-1][2:4]
        _, html, _ = await page(client, "/-/ui/?state=running")
        assert "<tr data-job=" not in html and "No sends match these filters." in html
        _, html, _ = await page(client, "/-/ui/?state=done&channel=email&limit=10")
        assert len(re.findall(r"<tr data-job=", html)) == 5
        _, html, _ = await page(client, "/-/ui/?channel=sms")
        assert "<tr data-job=" not in html
        for bad in ("state=nope", "channel=fax", "limit=0", "limit=x"):
            response = await client.get(f"/-/ui/?{bad}")
            assert response.status_code == 400
            assert set(await response.get_json()) == {"statusCode", "error", "message"}


async def test_progress_route_answers_the_live_part_of_the_jobs_asked_for(make_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    async with client_for(make_settings) as client:
        job_id = (await send(client, ["u1"]))["id"]
        response = await client.get(f"/-/ui/progress?id={job_id}&id=unknown")
        body = await response.get_json()
        [job] = body["jobs"]
        assert job["id"] == job_id and job["state"] == "done" and job["final"] is True
        assert 'aria-label="email: 1 sent of 1"' in job["html"] and "<table" not in job["html"]
        detail = await (await client.get(f"/-/ui/progress?id={job_id}&detail=1")).get_json()
        assert '<table class="counts">' in detail["jobs"][0]["html"]


async def test_headers_entry_redirect_assets_and_missing_things(make_settings) -> None:
    async with client_for(make_settings) as client:
        response = await client.get("/-/ui")
        assert response.status_code == 308 and response.headers["Location"] == "ui/"
        status, html, headers = await page(client, "/-/ui/service")
        assert status == 200 and "<h1>Service</h1>" in html and "embedded" not in html.split("Server")[0]
        assert (
            "script-src 'self'" in headers["Content-Security-Policy"]
            and "unsafe" not in headers["Content-Security-Policy"]
        )
        assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
        assert "<script>" not in html and "style=" not in html  # nothing inline: the policy allows none
        relative_only(html)
        response = await client.get("/-/ui/static/ui.js")
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/javascript")
        assert (await client.get("/-/ui/static/../settings.py")).status_code == 404
        assert (await client.get("/-/ui/static/nope.js")).status_code == 404
        status, html, _ = await page(client, "/-/ui/jobs/nope")
        assert status == 404 and "no send" in html


async def test_prefix_and_switch(make_settings) -> None:
    async with client_for(make_settings, ui={"prefix": "/ops/board"}) as client:
        response = await client.get("/ops/board")
        assert response.status_code == 308 and response.headers["Location"] == "board/"
        status, html, _ = await page(client, "/ops/board/")
        assert status == 200 and 'data-api="../../"' in html
        assert (await client.get("/-/ui/")).status_code == 404
    async with client_for(make_settings, ui={"enabled": False}) as client:
        response = await client.get("/-/ui/")
        assert response.status_code == 404 and (await response.get_json())["statusCode"] == 404


async def test_service_page_shows_limits_and_the_pauses_a_provider_imposed(make_settings) -> None:
    settings = make_settings(channels={"sms": {"rate_per_second": 7, "burst": 3, "concurrency": 4}})
    async with open_dispatcher(settings) as d:
        gate = d.transports["sms"].gate
        gate.bucket.pause_until(trio.current_time() + 30)
        gate.pause("+15551230001", trio.current_time() + 10)
        gate.pause("+15551230002", trio.current_time() - 1)  # over already
        async with create_app(d).test_app() as app:
            status, html, _ = await page(app.test_client(), "/-/ui/service")
    assert status == 200
    sms = re.search(r'<tr><th scope="row">sms</th>(.*?)</tr>', html, re.S).group(1)
    cells = [
        re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<td>(.*?)</td>", sms, re.S)
    ]
    assert cells[:5] == ["outbox", "0", "4", "7.0/s", "3"]
    assert re.fullmatch(
        r"the channel, (29\.\d|30\.0) s more \(the provider asked to slow down\); 1 destination", cells[5]
    )
    assert "+1555" not in html  # which destinations is not shown
    assert '<dt>State</dt><dd><span class="ok">answers</span>' in html and "Not configured" in html


@pytest.mark.parametrize("prefix", ["ui", "/ui/", "/send", "/send/ui", "/a b", ""])
def test_a_bad_prefix_stops_start_up_naming_the_key(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"ui\.prefix"):
        settings_from_dict({"ui": {"prefix": prefix}})


async def test_with_keys_on_pages_need_a_key_and_show_only_a_prompt_without_one(make_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    async with client_for(make_settings, auth={"keys": "good-key"}) as client:
        job_id = (await send(client, ["u1"], {"X-API-Key": "good-key"}))["id"]
        for path in ("/-/ui/", f"/-/ui/jobs/{job_id}", "/-/ui/service"):
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
                status, html, response_headers = await page(client, path, headers)
                assert status == 401 and 'id="key-form"' in html
                assert job_id not in html and "Calls in flight" not in html
                assert response_headers["Cache-Control"] == "no-store"
            status, html, _ = await page(client, path, {"X-API-Key": "good-key"})
            assert status == 200 and 'id="key-form"' not in html
        status, html, _ = await page(client, "/-/ui/", {"Authorization": "Bearer good-key"})
        assert job_id in html
        response = await client.get(f"/-/ui/progress?id={job_id}")
        assert response.status_code == 401 and (await response.get_json())["message"] == "an API key is required"
        # The page's own files carry nothing and load before any key is given.
        assert (await client.get("/-/ui/static/ui.css")).status_code == 200


def test_bars_count_pending_users_and_leave_an_unknown_total_open() -> None:
    # `sent` counts every accepted delivery, the delivered one too; "bounced" is a state this
    # page does not know: still drawn, after the others.
    summary = {"users": 3, "sent": {"sms": 3}, "failed": {"sms": 1}, "skipped": {}, "delivered": {"sms": 1}}
    summary["bounced"] = {"sms": 1}
    [bar] = channel_progress(summary, ["sms"], total=10, final=False)
    assert [(s.state, s.count, s.x, s.width) for s in bar.segments if s.count] == [
        ("delivered", 1, 0.0, 10.0),
        ("sent", 2, 10.0, 20.0),
        ("failed", 1, 30.0, 10.0),
        ("bounced", 1, 40.0, 10.0),
    ]
    assert bar.pending == 5 and bar.label == "sms: 1 delivered, 2 sent, 1 failed, 1 bounced, 5 pending of 10"
    [open_ended] = channel_progress(summary, ["sms"], total=None, final=False)
    assert open_ended.pending is None and open_ended.total is None and open_ended.label.endswith("more pending")
    [done] = channel_progress(summary, ["sms"], total=None, final=True)
    assert done.pending == 0 and done.total == 5 and sum(s.width for s in done.segments) == 100.0


def test_chart_bins_deliveries_by_time_and_stacks_states() -> None:
    events = [(1000.0 + i, "sent") for i in range(90)] + [(1000.5, "failed"), (1089.0, "failed")]
    chart = deliveries_chart(events, start=1000.0, end=1090.0)
    assert chart is not None and chart.step == 2 and chart.total == 92
    first = [b for b in chart.bars if b.x == 0.0]
    assert [(b.state, b.count) for b in first] == [("sent", 2), ("failed", 1)]
    assert chart.peak == 3 and min(b.y for b in chart.bars) == 0.0
    assert deliveries_chart([], 0.0, 1.0) is None


async def test_a_key_sees_its_own_jobs_and_an_admin_key_sees_every_job(make_settings, database, tmp_path) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        "".join(
            f"{name}:{hash_key(name + '-secret')}{' admin' if name == 'ops' else ''}\n" for name in ("a", "b", "ops")
        )
    )
    async with client_for(make_settings, auth={"keys_file": str(keys_file)}) as client:
        a_job = (await send(client, ["u1"], {"X-API-Key": "a-secret"}))["id"]
        b_job = (await send(client, ["u1"], {"X-API-Key": "b-secret"}))["id"]

        async def listed(key: str) -> list[str]:
            _, html, _ = await page(client, "/-/ui/", {"X-API-Key": key})
            return re.findall(r'<tr data-job="([0-9a-f]+)"', html)

        assert await listed("a-secret") == [a_job]
        assert await listed("b-secret") == [b_job]
        assert await listed("ops-secret") == [b_job, a_job]
        status, html, _ = await page(client, f"/-/ui/jobs/{b_job}", {"X-API-Key": "a-secret"})
        assert status == 404 and "<h1>Not found</h1>" in html and 'class="failures"' not in html
        status, _, _ = await page(client, f"/-/ui/jobs/{b_job}?user=u1", {"X-API-Key": "ops-secret"})
        assert status == 200
        response = await client.get(f"/-/ui/progress?id={a_job}&id={b_job}", headers={"X-API-Key": "a-secret"})
        assert [job["id"] for job in (await response.get_json())["jobs"]] == [a_job]


def test_every_file_of_the_page_ships_in_the_package() -> None:
    import tomllib
    from pathlib import Path

    import dispatcher.ui

    root = Path(dispatcher.ui.__file__).parent
    pyproject = tomllib.loads((root.parent.parent / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert "dispatcher.ui" in setuptools["packages"]
    files = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    shipped = {
        p.relative_to(root).as_posix()
        for pattern in setuptools["package-data"]["dispatcher.ui"]
        for p in root.glob(pattern)
    }
    assert files and files == shipped


async def test_behind_a_path_prefix_proxy_every_link_resolves_under_the_prefix(make_settings, database) -> None:
    """What a proxy serving the service at /ops/ shows the browser: each page's links, resolved
    from the page's public address, stay under /ops/ and answer once the proxy strips it."""
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    async with client_for(make_settings) as client:
        job_id = (await send(client, ["u1", "nobody"]))["id"]
        pages = ["/-/ui/", f"/-/ui/jobs/{job_id}", "/-/ui/service"]
        for path in pages:
            _, html, _ = await page(client, path)
            public = "https://proxy.example/ops" + path
            for target in re.findall(r'(?:href|src)="([^"#][^"]*)"', html):
                resolved = urlsplit(urljoin(public, target.replace("&amp;", "&")))
                assert resolved.netloc == "proxy.example" and resolved.path.startswith("/ops/"), (path, target)
                inner = resolved.path.removeprefix("/ops") + (f"?{resolved.query}" if resolved.query else "")
                response = await client.get(inner)
                assert response.status_code == 200, (path, target, inner)
