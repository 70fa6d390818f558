"""A `dispatcher serve` process of the test's own, on the session's store: started (and started
again after a kill) on one port, SIGKILLed for real, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from dispatcher.embedded_store import free_port


class Service:
    def __init__(self, config: Path, mongo_url: str, database: str, log: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "MONGODB_URL": mongo_url,
            "TWILIO_AUTH_TOKEN": "secret",
            "DISPATCHER__STORE__DATABASE": database,
            "DISPATCHER__SERVER__PORT": str(self.port),
        }
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        """Start the process and return once `/-/healthz` answers."""
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from dispatcher.cli import main; raise SystemExit(main())",
                    "--config",
                    str(self.config),
                    "serve",
                ],
                env=self.env,
                stdout=out,
                stderr=out,
            )
        async with httpx.AsyncClient() as client:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await client.get(f"http://127.0.0.1:{self.port}/-/healthz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    assert self.process.poll() is None, self.log.read_text()
                    await trio.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
