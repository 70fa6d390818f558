"""Processes die together (issue 17, point 2), killed for real with SIGKILL: the embedded store
dies with the service that started it, the workers of `serve --workers N` with their supervisor,
and a second service on the same data directory refuses to start instead of opening the same
files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from dispatcher.embedded_store import free_port

CLI = [sys.executable, "-c", "from dispatcher.cli import main; raise SystemExit(main())"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGODB_URL", "REDIS_URL", "DISPATCHER_CONFIG")}
    env["DISPATCHER__STORE__DATA_DIR"] = str(tmp_path / "var")
    env["DISPATCHER__PROVIDERS__OUTBOX__DIR"] = str(tmp_path / "var" / "outbox")
    env.update(extra)
    return env


def _wait(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _answers(port: int, path: str = "/-/ready") -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _store_children(pid: int) -> list[psutil.Process]:
    return [
        c
        for c in psutil.Process(pid).children(recursive=True)
        if c.status() != psutil.STATUS_ZOMBIE and "nx_27017" in " ".join(c.cmdline())
    ]


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _serve(tmp_path: Path, port: int, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*CLI, "serve", "--port", str(port), *args],
        env=env or _env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_the_embedded_store_dies_with_the_service_killed_outright(tmp_path: Path) -> None:
    port = free_port()
    service = _serve(tmp_path, port)
    try:
        _wait(lambda: _answers(port))
        [store] = _store_children(service.pid)
        service.send_signal(signal.SIGKILL)  # the service only, as the OOM killer does
        service.wait()
        _wait(lambda: _gone(store), timeout=10)
        # Nothing holds the files any more: the next service starts on them.
        again = _serve(tmp_path, port)
        try:
            _wait(lambda: _answers(port))
        finally:
            again.terminate()
            assert again.wait(30) == 0
    finally:
        if service.poll() is None:
            service.kill()


def test_a_second_service_on_the_same_data_directory_is_refused_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    first = _serve(tmp_path, port)
    try:
        _wait(lambda: _answers(port))
        second = subprocess.run(
            [*CLI, "serve", "--port", str(free_port())],
            env=_env(tmp_path),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        [line] = [line for line in second.stderr.splitlines() if line.startswith("error")]
        assert f"the embedded store in {tmp_path / 'var'} is in use by another process (pid {first.pid}" in line
        assert "Traceback" not in second.stderr
        # Seeding beside a running service is refused the same way.
        seed = tmp_path / "seed.json"
        seed.write_text('{"users": [], "templates": []}')
        seeded = subprocess.run(
            [*CLI, "seed", str(seed)], env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert seeded.returncode == 2 and "is in use by another process" in seeded.stderr
        assert _answers(port)  # the first one never noticed
    finally:
        first.terminate()
        first.wait(30)


def test_an_unwritable_data_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir()
    var.chmod(0o500)
    if os.access(var, os.W_OK):  # root ignores the mode: make it a file instead
        var.chmod(0o700)
        var.rmdir()
        var.write_text("not a directory")
    result = subprocess.run(
        [*CLI, "serve", "--port", str(free_port())],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("configuration error: store.data_dir: cannot use") and str(var) in line


def test_workers_exit_when_their_supervisor_is_killed(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    supervisor = _serve(tmp_path, port, "--workers", "2", env=_env(tmp_path, REDIS_URL=redis_url))
    try:
        _wait(lambda: _answers(port) and len(psutil.Process(supervisor.pid).children()) == 3)
        children = psutil.Process(supervisor.pid).children()  # two workers and the embedded store
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        _wait(lambda: all(_gone(child) for child in children), timeout=10)
        # Nobody serves the port any more, and a new supervisor takes the files and the port.
        assert not _answers(port)
        again = _serve(tmp_path, port, "--workers", "2", env=_env(tmp_path, REDIS_URL=redis_url))
        try:
            _wait(lambda: _answers(port))
        finally:
            again.terminate()
            assert again.wait(60) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


def test_an_unwritable_outbox_stops_start_up_with_one_line(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.write_text("a file where the outbox directory should be")
    result = subprocess.run(
        [*CLI, "serve", "--port", str(free_port())],
        env=_env(tmp_path, DISPATCHER__PROVIDERS__OUTBOX__DIR=str(outbox)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"configuration error: providers.outbox.dir: cannot write to {outbox}")
    )


def test_workers_auto_is_one_per_cpu_with_redis_and_one_without(tmp_path: Path, redis_url: str) -> None:
    cpus = len(os.sched_getaffinity(0))
    port = free_port()
    supervisor = subprocess.Popen(
        [*CLI, "serve", "--workers", "auto", "--port", str(port)],
        env=_env(tmp_path, REDIS_URL=redis_url),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: _answers(port))
        workers = [c for c in psutil.Process(supervisor.pid).children() if "nx_27017" not in " ".join(c.cmdline())]
        assert len(workers) == (cpus if cpus > 1 else 0)  # one CPU: a single process, no supervisor
    finally:
        supervisor.terminate()
        _, err = supervisor.communicate(timeout=60)
    assert f"--workers auto: {cpus} processes" in err
    alone = _serve(tmp_path, port, "--workers", "auto")  # no Redis: one process, said in the log
    try:
        _wait(lambda: _answers(port))
        assert not [c for c in psutil.Process(alone.pid).children() if "nx_27017" not in " ".join(c.cmdline())]
    finally:
        alone.terminate()
        assert alone.wait(30) == 0
