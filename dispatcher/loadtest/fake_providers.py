"""The fake providers in a process of their own, so that what they cost is measured apart from
the load generator (the harness process) and from the service.

`open_fake_providers(options, scratch)` starts `python -m dispatcher.loadtest.fake_providers SPEC`
(SPEC: the fakes' behaviour as JSON), which starts the fakes the selected channels need (the
aiosmtpd sink, fake Twilio, fake FCM and its token endpoint) and writes where they listen as its
first line. After that the pipe carries questions and answers: a newline on the child's stdin
asks for what the fakes received since the last question, and the child answers with one JSON
line (a `ReceiptCollector` batch) on its stdout. The harness asks only when it reads (the live
display, a phase's boundaries), so the child spends nothing on reporting in between.

The child dies with the harness (`children.die_with_parent`) and stops when its stdin closes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..children import die_with_parent, python_environment
from ..errors import DispatcherError
from ..fakes import Faults, serve_asgi
from ..fakes.fcm import FakeFcm, FakeOAuthToken, write_service_account_key
from ..fakes.smtp import SmtpSink
from ..fakes.twilio import FakeTwilio, ReceiptPlan
from .options import LoadTestOptions
from .receipts import ReceiptCollector, ReceiptTap, StampedList

log = logging.getLogger(__name__)

FCM_PROJECT = "loadtest-project"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 5.0


class FakesError(DispatcherError):
    """The fakes' process did not start, or stopped answering (its log says why)."""


@dataclass(frozen=True)
class FakesSpec:
    """How the fakes behave: what the child needs from the load test's options."""

    channels: tuple[str, ...]
    latency: float | tuple[float, float]
    errors: dict[str, tuple[float, float, float]]  # channel -> (permanent, transient, throttle)
    retry_after: float
    seed: int
    receipts_delay: float | None
    scratch: str  # where the service-account key goes

    @classmethod
    def of(cls, options: LoadTestOptions, scratch: Path) -> FakesSpec:
        return cls(
            channels=options.channels,
            latency=options.latency,
            errors={
                c: (m.permanent, m.transient, m.throttle)
                for c in options.channels
                if (m := options.errors_for(c)).total
            },
            retry_after=options.retry_after,
            seed=options.seed,
            receipts_delay=options.receipts_delay,
            scratch=str(scratch),
        )

    @classmethod
    def from_json(cls, text: str) -> FakesSpec:
        raw = json.loads(text)
        latency = raw["latency"]
        return cls(
            channels=tuple(raw["channels"]),
            latency=tuple(latency) if isinstance(latency, list) else latency,
            errors={c: tuple(rates) for c, rates in raw["errors"].items()},
            retry_after=raw["retry_after"],
            seed=raw["seed"],
            receipts_delay=raw["receipts_delay"],
            scratch=raw["scratch"],
        )


@dataclass(frozen=True)
class Fakes:
    """Where the running fakes listen (empty for a provider no selected channel uses), their
    credentials, and the process they run in."""

    pid: int
    smtp_host: str = "127.0.0.1"
    smtp_port: int | None = None
    twilio_url: str = ""
    twilio_sid: str = ""
    twilio_token: str = ""
    fcm_url: str = ""
    fcm_project: str = FCM_PROJECT
    key_file: Path | None = None


# --- in the fakes' process ---------------------------------------------------------------


@dataclass
class _Running:
    sink: SmtpSink | None = None
    twilio: FakeTwilio | None = None
    fcm: FakeFcm | None = None
    endpoints: dict[str, Any] = field(default_factory=dict)  # the `Fakes` fields, as JSON


def _faults(spec: FakesSpec, channel: str, offset: int) -> Faults:
    permanent, transient, throttle = spec.errors.get(channel, (0.0, 0.0, 0.0))
    # A seed per fake so that runs repeat while the fakes do not draw the same sequence.
    return Faults(
        latency=spec.latency,
        permanent_rate=permanent,
        transient_rate=transient,
        throttle_rate=throttle,
        retry_after=spec.retry_after,
        seed=spec.seed * 10 + offset,
    )


@asynccontextmanager
async def _open_fakes(spec: FakesSpec) -> AsyncIterator[_Running]:
    """Start the fakes the selected channels need, with the spec's latency and error mix."""
    running = _Running()
    endpoints = running.endpoints
    channels = set(spec.channels)
    async with trio.open_nursery() as nursery:
        try:
            if "email" in channels:
                # record_data=False: a 100,000-message run would otherwise keep every body.
                sink = running.sink = SmtpSink(faults=_faults(spec, "email", 1), record_data=False)
                sink.received = StampedList()
                await trio.to_thread.run_sync(sink.start)
                endpoints.update(smtp_host=sink.host, smtp_port=sink.port)
            if channels & {"sms", "voice"}:
                # One account serves both channels; its error mix is SMS's (voice's without SMS).
                sid, token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
                running.twilio = FakeTwilio(
                    sid,
                    token,
                    faults=_faults(spec, "sms" if "sms" in channels else "voice", 2),
                    receipts=ReceiptPlan(delay=spec.receipts_delay or 0.0, mix={"undelivered": 0.02}, seed=spec.seed),
                )
                url = await nursery.start(serve_asgi, running.twilio)
                endpoints.update(twilio_url=url, twilio_sid=sid, twilio_token=token)
            if "push" in channels:
                oauth = FakeOAuthToken()
                token_url = await nursery.start(serve_asgi, oauth)
                key = write_service_account_key(
                    Path(spec.scratch) / "service-account.json", f"{token_url}/token", FCM_PROJECT
                )
                oauth.trust(key)
                running.fcm = FakeFcm(FCM_PROJECT, oauth, faults=_faults(spec, "push", 3))
                url = await nursery.start(serve_asgi, running.fcm)
                endpoints.update(fcm_url=url, fcm_project=FCM_PROJECT, key_file=str(key.path))
            yield running
        finally:
            if running.sink is not None:
                running.sink.stop()  # blocking, briefly: it joins the sink's thread
            nursery.cancel_scope.cancel()


async def _serve(spec: FakesSpec, answers_fd: int) -> None:
    questions = trio.lowlevel.FdStream(os.dup(0))
    answers = trio.lowlevel.FdStream(answers_fd)
    async with _open_fakes(spec) as running:
        collector = ReceiptCollector(running.sink, running.twilio, running.fcm)
        await answers.send_all(json.dumps(running.endpoints).encode() + b"\n")
        while data := await questions.receive_some():  # b"": the harness closed the pipe (or died)
            for _ in range(data.count(b"\n")):
                batch = json.dumps(collector.drain(), separators=(",", ":"))
                await answers.send_all(batch.encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    spec = FakesSpec.from_json((argv if argv is not None else sys.argv[1:])[0])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # The answers keep their own descriptor; anything a library prints goes to the log instead.
    answers_fd = os.dup(1)
    os.dup2(2, 1)
    trio.run(_serve, spec, answers_fd)


# --- in the harness ------------------------------------------------------------------------


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream, log_path: Path) -> None:
        self._stream, self._log_path = stream, log_path
        self._buffer = bytearray()

    async def next(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            data = await self._stream.receive_some(1 << 16)
            if not data:
                raise FakesError(f"the fakes' process stopped:\n{_tail(self._log_path)}")
            self._buffer += data
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    async def aclose(self) -> None:
        await self._stream.aclose()


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError:
        return "(no log)"


@asynccontextmanager
async def open_fake_providers(options: LoadTestOptions, scratch: Path) -> AsyncIterator[tuple[Fakes, ReceiptTap]]:
    """Start the fakes' process; yield where the fakes listen and the tap of what they receive."""
    spec = json.dumps(asdict(FakesSpec.of(options, scratch)))
    log_path = scratch / "fakes.log"
    with open(log_path, "wb") as log_file:
        # Forked from this (the main) thread, not with `trio.lowlevel.open_process`, which forks
        # from a worker thread: the death signal comes when the forking thread exits.
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.loadtest.fake_providers", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=python_environment(os.environ),
            # Not in the terminal's process group: a Ctrl-C stops the harness, which stops this.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    assert process.stdin is not None and process.stdout is not None
    questions = trio.lowlevel.FdStream(os.dup(process.stdin.fileno()))
    lines = _Lines(trio.lowlevel.FdStream(os.dup(process.stdout.fileno())), log_path)
    process.stdin.close()
    process.stdout.close()
    try:
        with trio.move_on_after(START_TIMEOUT_SECONDS) as waiting:
            endpoints = json.loads(await lines.next())
        if waiting.cancelled_caught:
            raise FakesError(f"the fakes did not start within {START_TIMEOUT_SECONDS:.0f}s:\n{_tail(log_path)}")
        key_file = endpoints.pop("key_file", None)
        fakes = Fakes(pid=process.pid, key_file=Path(key_file) if key_file else None, **endpoints)

        async def fetch() -> dict[str, Any]:
            await questions.send_all(b"\n")
            batch: dict[str, Any] = json.loads(await lines.next())
            return batch

        yield fakes, ReceiptTap(fetch)
    finally:
        with trio.CancelScope(shield=True):
            await questions.aclose()  # the child's signal to stop
            await lines.aclose()
            with trio.move_on_after(STOP_TIMEOUT_SECONDS):
                while process.poll() is None:
                    await trio.sleep(0.02)
            if process.poll() is None:
                log.warning("the fakes' process %d did not stop: killing it", process.pid)
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
