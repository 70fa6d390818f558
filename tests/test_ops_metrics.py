"""`GET /-/metrics`: Prometheus text format, HTTP requests by route template, the delivery-path
helpers with bounded labels, and aggregation over several processes."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import metrics


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def scrape() -> str:
    body, _ = metrics.render()
    return body.decode()


async def get_metrics(client: Any) -> str:
    response = await client.get("/-/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    return (await response.get_data()).decode()


async def test_metrics_endpoint_counts_requests_by_route_template(client: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "ada@example.com"})
    before = await get_metrics(client)
    assert "# TYPE dispatcher_deliveries_total counter" in before
    assert "# TYPE dispatcher_provider_call_seconds histogram" in before

    send = {"channels": ["email"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "C"}
    assert (await client.post("/send", json=send)).status_code == 200
    assert (await client.post("/send", json={"channels": ["fax"]})).status_code == 400
    assert (await client.get("/send/64b000000000000000000001/secret")).status_code in (401, 404)
    after = await get_metrics(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("dispatcher_http_requests_total", method="POST", route="/send", status="200") == 1
    assert delta("dispatcher_http_requests_total", method="POST", route="/send", status="400") == 1
    assert delta("dispatcher_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert delta("dispatcher_http_requests_total", method="GET", route="/-/metrics", status="200") == 1
    assert delta("dispatcher_http_request_duration_seconds_count", method="POST", route="/send") == 2
    # Raw paths and ids never become labels.
    assert "64b000000000000000000001" not in after and "ada@example.com" not in after


def test_delivery_helpers_record_with_bounded_labels() -> None:
    before = scrape()
    metrics.observe_attempt("sms", "twilio", 0.2, "transient")
    metrics.observe_retry("sms", "twilio")
    metrics.observe_attempt("sms", "twilio", 0.05, "ok")
    metrics.observe_delivery("sms", "twilio", "sent")
    metrics.observe_delivery("email", "smtp", "failed", "permanent")
    metrics.observe_delivery("email", "smtp", "skipped")
    metrics.observe_rate_limit_wait("sms", 0.75)
    metrics.observe_job("running")
    # Anything outside the known sets is folded into "other", whatever the caller passes.
    metrics.observe_delivery("u42@example.com", "+15550000001", "failed", "user u42 blew up")
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("dispatcher_provider_call_seconds_count", channel="sms", provider="twilio") == 2
    assert delta("dispatcher_provider_call_seconds_sum", channel="sms", provider="twilio") >= 0.25 - 1e-9
    assert delta("dispatcher_provider_call_seconds_bucket", channel="sms", provider="twilio", le="0.1") == 1
    assert delta("dispatcher_provider_calls_total", channel="sms", provider="twilio", outcome="transient") == 1
    assert delta("dispatcher_retries_total", channel="sms", provider="twilio") == 1
    assert delta("dispatcher_deliveries_total", channel="sms", provider="twilio", outcome="sent") == 1
    assert delta("dispatcher_deliveries_total", channel="email", provider="smtp", outcome="failed") == 1
    assert delta("dispatcher_deliveries_total", channel="email", provider="smtp", outcome="skipped") == 1
    assert delta("dispatcher_delivery_failures_total", channel="email", provider="smtp", kind="permanent") == 1
    assert delta("dispatcher_rate_limit_wait_seconds_count", channel="sms") == 1
    assert delta("dispatcher_jobs_total", state="running") == 1
    assert delta("dispatcher_deliveries_total", channel="other", provider="other", outcome="failed") == 1
    assert delta("dispatcher_delivery_failures_total", channel="other", provider="other", kind="other") == 1
    assert "u42" not in after and "15550000001" not in after


def test_in_flight_gauges_follow_the_blocks() -> None:
    base = value(scrape(), "dispatcher_sends_in_flight")
    in_flight = metrics.deliveries_in_flight("push")
    with metrics.track_send():
        in_flight.inc()
        in_flight.inc()
        inside = scrape()
        in_flight.dec()
        in_flight.dec()
    outside = scrape()
    assert value(inside, "dispatcher_sends_in_flight") == base + 1
    assert value(inside, "dispatcher_deliveries_in_flight", channel="push") == 2
    assert value(outside, "dispatcher_sends_in_flight") == base
    assert value(outside, "dispatcher_deliveries_in_flight", channel="push") == 0


async def test_queue_depth_is_sampled_from_the_tracked_channels() -> None:
    send, receive = trio.open_memory_channel[int](8)
    metrics.track_queue("send", send)
    for i in range(3):
        send.send_nowait(i)
    assert value(scrape(), "dispatcher_queue_depth", stage="send") == 3
    await receive.receive()
    assert value(scrape(), "dispatcher_queue_depth", stage="send") == 2
    send.close(), receive.close()
    del send, receive
    gc.collect()
    assert value(scrape(), "dispatcher_queue_depth", stage="send") == 0


async def test_openmetrics_on_request(client: Any) -> None:
    response = await client.get("/-/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.content_type.startswith("application/openmetrics-text")
    assert (await response.get_data()).decode().rstrip().endswith("# EOF")


WORKER = textwrap.dedent("""
    import sys
    from dispatcher import metrics
    for _ in range(int(sys.argv[1])):
        metrics.observe_delivery("email", "smtp", "sent")
        metrics.observe_attempt("email", "smtp", 0.01, "ok")
    with metrics.track_send():
        sys.stdout.write("in flight\\n"); sys.stdout.flush()
        sys.stdin.readline()  # hold the send until told
""")
SCRAPE = "from dispatcher import metrics; print(metrics.render()[0].decode())"


def test_several_processes_aggregate_through_the_multiprocess_dir(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(n)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for n in (2, 3)
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline() == "in flight\n"
        live = subprocess.run([sys.executable, "-c", SCRAPE], env=env, capture_output=True, text=True, timeout=60)
        assert live.returncode == 0, live.stderr
        assert value(live.stdout, "dispatcher_deliveries_total", channel="email", provider="smtp", outcome="sent") == 5
        assert value(live.stdout, "dispatcher_provider_call_seconds_count", channel="email", provider="smtp") == 5
        assert value(live.stdout, "dispatcher_sends_in_flight") == 2
    finally:
        for worker in workers:
            worker.communicate("\n", timeout=30)
    # The workers are gone: their counts stay, their live gauges are dropped.
    for worker in workers:
        subprocess.run(
            [sys.executable, "-c", f"from dispatcher import metrics; metrics.mark_process_dead({worker.pid})"],
            env=env,
            check=True,
            timeout=60,
        )
    done = subprocess.run([sys.executable, "-c", SCRAPE], env=env, capture_output=True, text=True, timeout=60)
    assert value(done.stdout, "dispatcher_deliveries_total", channel="email", provider="smtp", outcome="sent") == 5
    assert value(done.stdout, "dispatcher_sends_in_flight") == 0
    subprocess.run(
        [sys.executable, "-c", "from dispatcher import metrics; metrics.clear_multiprocess_dir()"],
        env=env,
        check=True,
        timeout=60,
    )
    assert not list(directory.glob("*.db"))


async def test_deliveries_in_flight_moves_during_a_running_send(
    make_settings: Any, database: Any, nursery: trio.Nursery
) -> None:
    from dispatcher import open_dispatcher
    from dispatcher.fakes.faults import Faults
    from dispatcher.fakes.server import serve_asgi
    from dispatcher.fakes.twilio import FakeTwilio

    fake = FakeTwilio("AC1", "tok", Faults(latency=0.5))
    url = await nursery.start(serve_asgi, fake)
    settings = make_settings(
        channels={"sms": {"provider": "twilio", "concurrency": 3}},
        providers={"twilio": {"account_sid": "AC1", "auth_token": "tok", "api_base_url": url}},
    )
    database.users.insert_many([{"_id": f"u{i}", "phoneNumber": f"+1555000{i:04d}"} for i in range(6)])
    base = value(scrape(), "dispatcher_deliveries_in_flight", channel="sms")
    async with open_dispatcher(settings) as d:
        job = await d.submit({"channels": ["sms"], "recipients": [f"u{i}" for i in range(6)], "messageContent": "x"})
        with trio.fail_after(10):
            while not fake.attempts:
                await trio.sleep(0.01)
        during = value(scrape(), "dispatcher_deliveries_in_flight", channel="sms")
        with trio.fail_after(30):
            while (await d.status(job)).state != "done":
                await trio.sleep(0.05)
    assert during - base >= 1
    assert value(scrape(), "dispatcher_deliveries_in_flight", channel="sms") == base


def test_counters_have_no_created_series_and_the_build_is_named() -> None:
    from dispatcher import __version__

    metrics.observe_delivery("email", "smtp", "sent")
    text = scrape()
    assert "_created" not in text
    assert "# TYPE dispatcher_redis_limit_round_trips_total counter" in text
    [build] = [s for s in samples(text) if s[0] == "dispatcher_build_info"]
    assert dict(build[1])["version"] == __version__ and value(text, build[0], **dict(build[1])) == 1
