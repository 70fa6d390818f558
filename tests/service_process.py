"""A `dispatcher serve` process of the test's own, on the session's store (or, without one, on an
embedded store it starts itself): started (and started again after a kill) on one port, in the
test's directory, SIGKILLed for real, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from dispatcher.embedded_store import free_port


CLI = [sys.executable, "-c", "from dispatcher.cli import main; raise SystemExit(main())"]


class Service:
    def __init__(self, config: Path, mongo_url: str | None, database: str | None, log: Path) -> None:
        """`mongo_url` None: the embedded store of `[store].data_dir`."""
        self.port = free_port()
        # What the developer's shell may hold must not choose the store, Redis or configuration.
        self.env = {k: v for k, v in os.environ.items() if k not in ("MONGODB_URL", "REDIS_URL", "DISPATCHER_CONFIG")}
        self.env.update({"TWILIO_AUTH_TOKEN": "secret", "DISPATCHER__SERVER__PORT": str(self.port)})
        if mongo_url is not None and database is not None:
            self.env.update({"MONGODB_URL": mongo_url, "DISPATCHER__STORE__DATABASE": database})
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, ready: str = "/-/healthz") -> None:
        """Start the process and return once `ready` answers 200."""
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*CLI, "--config", str(self.config), "serve"],
                env=self.env,
                stdout=out,
                stderr=out,
                cwd=self.log.parent,
            )
        async with httpx.AsyncClient() as client:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await client.get(f"{self.url}{ready}")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    assert self.process.poll() is None, self.log.read_text()
                    await trio.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, seconds: float = 15) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
