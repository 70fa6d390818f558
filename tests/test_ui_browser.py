"""The operations page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven
by selenium): the service runs with the fake Twilio, a paced SMS campaign runs, and the page is
used as an operator would: its progress bar advances without a reload, the job's failed user is
found, the campaign is cancelled from the page. With API keys on, a wrong key sees nothing.

`UI_SCREENSHOTS=docs` writes the README's screenshots (docs/ui-jobs.png, docs/ui-job.png).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from dispatcher import open_dispatcher
from dispatcher.app import create_app
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (`apt-get install chromium chromium-driver`; "
    ".ci/run installs them)",
)

SID = "AC" + "0" * 31 + "7"
TOKEN = "tok"
USERS = 30
RATE = 5  # SMS per second: the campaign takes ~6 s unless cancelled
SCREENSHOTS = os.environ.get("UI_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Without the background-networking flags Chromium phones home, which a closed network refuses.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,860",
    ):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="ui-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@asynccontextmanager
async def service(
    make_settings: Callable[..., Any], database: Any, **sections: Any
) -> AsyncIterator[tuple[str, FakeTwilio]]:
    """The service on a real port with SMS on the fake Twilio at `RATE` per second; `USERS` users,
    the first of whom Twilio refuses (a permanent error)."""
    database.users.insert_many([{"_id": f"user{n:03d}", "phoneNumber": f"+1555123{n:04d}"} for n in range(USERS)])
    fake = FakeTwilio(SID, TOKEN)
    fake.faults.script = deque(["permanent"])
    async with trio.open_nursery() as nursery:
        twilio_url = await nursery.start(serve_asgi, fake)
        settings = make_settings(
            channels={
                "active": ["email", "sms"],
                "sms": {"provider": "twilio", "rate_per_second": RATE, "concurrency": 2},
            },
            providers={"twilio": {"account_sid": SID, "auth_token": TOKEN, "api_base_url": twilio_url}},
            ui={"poll_seconds": 0.5},
            **sections,
        )
        async with open_dispatcher(settings) as d:
            config = Config()
            config.bind = ["127.0.0.1:0"]
            config.accesslog = None
            config.graceful_timeout = 0
            stop = trio.Event()
            urls = await nursery.start(partial(hypercorn_serve, create_app(d), config, shutdown_trigger=stop.wait))
            try:
                yield urls[0], fake
            finally:
                stop.set()
                # Cancel what the test left running: the drain would wait for it.
                for job_id in list(d._jobs.runs):
                    await d.cancel(job_id)
        nursery.cancel_scope.cancel()


async def start_campaign(base: str, headers: dict[str, str] | None = None) -> str:
    async with httpx.AsyncClient(base_url=base, headers=headers or {}) as http:
        response = await http.post(
            "/send?async=true",
            json={"channels": ["sms"], "recipients": [f"user{n:03d}" for n in range(USERS)], "messageContent": "Hi"},
        )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 30, message: str = "") -> Any:
    # The script swaps parts of the page: an element found a moment ago may be gone.
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(condition, message)


def text_of(driver: Any, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def done_count(driver: Any, job_id: str) -> int:
    """What the row's first bar says is done ("12/30" -> 12)."""
    text = text_of(driver, f"tr[data-job='{job_id}'] .bar-count")
    return int(text.split("/")[0]) if text else -1


def screenshot(driver: Any, name: str, height: int = 860) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1280, height)
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))
        driver.set_window_size(1280, 860)


async def test_operator_follows_a_campaign_finds_a_failure_and_cancels_it(browser, make_settings, database) -> None:
    async with service(make_settings, database) as (base, fake):
        async with httpx.AsyncClient(base_url=base) as http:  # an earlier send, finished
            body = {"channels": ["email"], "recipients": ["user001", "user002", "nobody"], "messageTitle": "T"}
            assert (await http.post("/send", json={**body, "messageContent": "Hi"})).status_code == 200
        job_id = await start_campaign(base)

        def watch_the_list() -> tuple[int, int]:
            browser.get(f"{base}/-/ui")  # redirected to /-/ui/
            assert browser.current_url == f"{base}/-/ui/"
            wait_for(browser, lambda d: done_count(d, job_id) >= 1, message="the job's row and bar")
            first = done_count(browser, job_id)
            # Marks this page: a reload would lose it, so the bar below moved by polling.
            browser.execute_script("window.stillTheSamePage = true")
            wait_for(browser, lambda d: done_count(d, job_id) >= first + 3, message="the bar advancing")
            assert browser.execute_script("return window.stillTheSamePage") is True
            screenshot(browser, "ui-jobs.png")
            return first, done_count(browser, job_id)

        first, later = await trio.to_thread.run_sync(watch_the_list)
        assert 1 <= first < later < USERS

        def find_the_failed_user() -> str:
            browser.find_element(By.CSS_SELECTOR, f"tr[data-job='{job_id}'] a.job-link").click()
            wait_for(browser, lambda d: job_id in d.find_element(By.TAG_NAME, "h1").text)
            failed = browser.find_element(By.CSS_SELECTOR, "table.failures tbody th a").text
            reason = text_of(browser, "table.failures tbody td:last-child")
            assert "21610" in reason or "refused" in reason.lower() or reason, reason
            box = browser.find_element(By.ID, "user-id")
            box.send_keys(failed)
            box.submit()
            wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "table.deliveries tbody tr"))
            row = text_of(browser, "table.deliveries tbody tr")
            assert row.startswith("sms failed"), row
            screenshot(browser, "ui-job.png", height=1500)
            return failed

        failed_user = await trio.to_thread.run_sync(find_the_failed_user)
        assert failed_user == "user000"  # the fake refused the first request

        def cancel_it() -> None:
            browser.find_element(By.CSS_SELECTOR, "button[data-cancel]").click()
            assert browser.find_element(By.ID, "cancel-dialog").is_displayed()
            browser.find_element(By.ID, "confirm-cancel").click()
            wait_for(
                browser, lambda d: text_of(d, "[data-state]") == "cancelled", message="the state turning cancelled"
            )
            # The poll writes the state at once; the counts come with the page it loads next.
            wait_for(
                browser,
                lambda d: "cancelled" in text_of(d, "table.counts thead"),
                message="the counts showing the cancelled deliveries",
            )

        await trio.to_thread.run_sync(cancel_it)
        async with httpx.AsyncClient(base_url=base) as http:
            status = (await http.get(f"/send/{job_id}")).json()
        assert status["status"] == "cancelled" and status["summary"]["cancelled"]["sms"] > 0
    # The cancel stopped real calls: the fake saw fewer than every user.
    assert len(fake.attempts) < USERS


async def test_with_keys_on_a_wrong_key_sees_nothing_and_the_key_never_goes_in_a_url(
    browser, make_settings, database, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="dispatcher.access")
    async with service(make_settings, database, auth={"keys": "good-key"}) as (base, _):
        job_id = await start_campaign(base, {"X-API-Key": "good-key"})

        def use_the_page() -> list[str]:
            urls = []
            browser.get(f"{base}/-/ui/")
            form = wait_for(browser, lambda d: d.find_element(By.ID, "key-form"))
            assert job_id not in browser.page_source
            box = browser.find_element(By.ID, "api-key")
            box.send_keys("wrong-key")
            form.submit()
            wait_for(browser, lambda d: text_of(d, "#key-error") == "That key was refused.")
            assert job_id not in browser.page_source and not browser.find_elements(By.CSS_SELECTOR, "tr[data-job]")
            urls.append(browser.current_url)
            box = browser.find_element(By.ID, "api-key")
            box.send_keys("good-key")
            browser.find_element(By.ID, "key-form").submit()
            wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-job='{job_id}']"))
            urls.append(browser.current_url)
            # Links are followed with the key too, and a reload finds it in the tab's session storage.
            browser.find_element(By.CSS_SELECTOR, f"tr[data-job='{job_id}'] a.job-link").click()
            wait_for(browser, lambda d: job_id in text_of(d, "h1"))
            urls.append(browser.current_url)
            browser.refresh()
            wait_for(browser, lambda d: job_id in text_of(d, "h1"))
            wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "table.failures tbody th a"))
            browser.find_element(By.CSS_SELECTOR, "table.failures tbody th a").click()
            wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "table.deliveries tbody tr"))
            urls.append(browser.current_url)
            browser.find_element(By.ID, "forget-key").click()
            wait_for(browser, lambda d: d.find_elements(By.ID, "key-form"))
            assert job_id not in text_of(browser, "main")
            return urls

        urls = await trio.to_thread.run_sync(use_the_page)
        assert urls[-2].startswith(f"{base}/-/ui/jobs/{job_id}") and urls[-1].endswith("?user=user000")
    logged = [record.getMessage() for record in caplog.records if record.name == "dispatcher.access"]
    assert any("/-/ui/jobs/" in line and " 200 " in line for line in logged)  # pages were loaded with the key
    assert not any("good-key" in part or "wrong-key" in part for part in urls + logged)


async def test_a_dead_callback_is_retried_from_the_service_page(browser, make_settings, database, monkeypatch) -> None:
    import base64

    from dispatcher.fakes.webhooks import WebhookReceiver

    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    monkeypatch.setenv("DISPATCHER_CALLBACK_SECRET", secret)
    receiver = WebhookReceiver(secret, script=[400])
    fast = {"allow_http": True, "allow_private": True, "poll_seconds": 0.05, "timeout_seconds": 2, "secret": secret}
    async with trio.open_nursery() as nursery:
        hooks = await nursery.start(serve_asgi, receiver)
        async with service(make_settings, database, callbacks=fast) as (base, _):
            async with httpx.AsyncClient(base_url=base) as http:
                body = {"channels": ["email"], "recipients": ["user001"], "messageTitle": "T", "messageContent": "Hi"}
                response = await http.post("/send", json={**body, "callbackUrl": f"{hooks}/hooks"})
                job_id = response.json()["id"]

            def retry_it() -> None:
                browser.get(f"{base}/-/ui/service")
                wait_for(
                    browser, lambda d: d.find_elements(By.CSS_SELECTOR, "button[data-retry]"), message="a dead letter"
                )
                assert job_id[:12] in text_of(browser, "table.callbacks tbody")
                browser.find_element(By.CSS_SELECTOR, "button[data-retry]").click()
                wait_for(browser, lambda d: "No dead letters." in text_of(d, "main"), message="the letter leaving")

            with trio.fail_after(30):
                while True:  # the first try's 400 makes it dead
                    async with httpx.AsyncClient(base_url=base) as http:
                        if (await http.get("/callbacks?state=dead")).json()["callbacks"]:
                            break
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(retry_it)
            with trio.fail_after(15):
                while not receiver.received:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert receiver.received[0].body["jobId"] == job_id
