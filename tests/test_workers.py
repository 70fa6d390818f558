"""`dispatcher serve --workers N`: refused without Redis, N processes on one socket with it,
a dead worker replaced, a signal passed on to all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from dispatcher.embedded_store import free_port

CLI = [sys.executable, "-c", "from dispatcher.cli import main; raise SystemExit(main())"]


def test_more_than_one_worker_without_redis_is_refused_saying_why(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DISPATCHER_CONFIG")}
    result = subprocess.run(
        [*CLI, "serve", "--workers", "2", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--workers 2: needs [cluster].redis_url" in result.stderr
    assert "2 times the allowed rate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _children(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if c.status() != psutil.STATUS_ZOMBIE]


def _wait(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@contextmanager
def _supervisor(
    tmp_path: Path, port: int, mongo_url: str, redis_url: str, database: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """`dispatcher serve --workers 2` on `port`, killed at the end if it is still running."""
    env = {
        **os.environ,
        "MONGODB_URL": mongo_url,
        "REDIS_URL": redis_url,
        "DISPATCHER__STORE__DATABASE": database.name,
        "DISPATCHER__PROVIDERS__OUTBOX__DIR": str(tmp_path / "outbox"),
    }
    supervisor = subprocess.Popen(
        [*CLI, "serve", "--workers", "2", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield supervisor
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_workers_share_one_port_are_replaced_when_they_die_and_stop_together(
    tmp_path: Path, mongo_url: str, redis_url: str, database: Any
) -> None:
    port = free_port()
    with _supervisor(tmp_path, port, mongo_url, redis_url, database) as supervisor:

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(lambda: len(_children(supervisor.pid)) == 2 and answers())
        database.users.insert_one({"_id": "u1", "phoneNumber": "+15550001111"})
        response = httpx.post(
            f"http://127.0.0.1:{port}/send",
            timeout=30,
            json={"channels": ["sms"], "recipients": ["u1"], "messageContent": "hi"},
        )
        assert response.status_code == 200 and response.json()["summary"]["sent"] == {"sms": 1}

        first = _children(supervisor.pid)[0]
        first.kill()
        _wait(
            lambda: len(_children(supervisor.pid)) == 2 and first.pid not in {c.pid for c in _children(supervisor.pid)}
        )
        _wait(answers)

        workers = _children(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_a_signal_during_a_workers_restart_stops_the_new_worker_too(
    tmp_path: Path, mongo_url: str, redis_url: str, database: Any
) -> None:
    """SIGTERM within the pause before a dead worker's replacement starts: the replacement is
    started after the signal was passed on, and must stop too (the supervisor waited for it)."""
    with _supervisor(tmp_path, free_port(), mongo_url, redis_url, database) as supervisor:
        _wait(lambda: len(_children(supervisor.pid)) == 2)
        first = _children(supervisor.pid)[0]
        first.kill()
        first.wait(10)
        # Reaped by the supervisor, which now pauses (1 s) before starting another.
        _wait(lambda: len(_children(supervisor.pid)) == 1)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
