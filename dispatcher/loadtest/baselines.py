"""Baselines that put the pipeline's throughput in perspective, on the same fakes:

- ceiling: the same provider classes (`open_providers`: SmtpProvider, TwilioProvider,
  FcmProvider) at the channel's concurrency, `concurrency` worker tasks per channel sending
  pre-rendered `Message`s in a bare loop: no store, renderer, actors or HTTP; no retries.
- naive: one store query (pymongo), Jinja2 rendering and one send at a time, one after the other,
  with the same provider classes. It bounds what a sequential script gets: one provider round
  trip (plus its own CPU) per delivery, whatever the machine; the pipeline's ratio to it is the
  concurrency the pipeline turns into throughput, not a measure of the pipeline's efficiency.
- apprise: the `apprise` library mailing the same e-mails to the same SMTP sink, one `notify`
  per user (the e-mails are personalised), from as many threads as the e-mail channel has
  connections (the smaller of `[channels.email].concurrency` and `[providers.smtp].pool_size`).
  Each notify opens, uses and closes its own SMTP connection, as Apprise's mailto plugin does:
  it measures Apprise as a sender of personalised mail at the same concurrency, connection
  set-up included.

Every run reports its CPU time (user + system, every thread of the process) over its timed
section, for the CPU-seconds-per-delivery comparison with the service.

Each runs where the service runs: in a child process for `--mode process` (this module's
`python -m dispatcher.loadtest.baselines`, which prints its result as JSON), in the harness for
`--mode embedded`. The harness counts what the fakes received; the figures here are the client's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jinja2
import trio

from ..errors import DeliveryError
from ..messages import Content, EmailContent, EmailOptions, Message, PushContent, TextContent
from ..providers import Provider, open_providers
from ..plan import address_field, addresses_of
from ..ratelimit import TokenBucket
from ..settings import Settings, load_settings
from .drivers import CONTENT, DATA, TITLE
from .population import CLUSTER, Population

KINDS = ("ceiling", "naive", "apprise")


@dataclass(frozen=True, slots=True)
class BaselineRun:
    kind: str
    elapsed_s: float
    users: int  # users covered: all, or the sample
    attempted: int  # provider sends (one per address)
    sent: int  # accepted
    failed: int
    sampled: bool
    cpu_s: float = 0.0  # CPU time of this process over the timed section
    concurrency: int = 1  # senders at once (ceiling: per channel)


class _Texts:
    """The pipeline's texts, rendered with plain Jinja2 (what a hand-written loop would use)."""

    def __init__(self, settings: Settings) -> None:
        environment = jinja2.Environment(undefined=jinja2.ChainableUndefined, autoescape=False)
        self.title = environment.from_string(TITLE)
        self.content = environment.from_string(CONTENT)
        self.settings = settings

    def content_for(self, channel: str, user: dict[str, Any]) -> Content:
        context = {"user": user, "data": DATA}
        body = self.content.render(context)
        if channel == "email":
            subject = " ".join(self.title.render(context).splitlines())
            return EmailContent(subject, body, None, EmailOptions(sender=self.settings.sender.email))
        if channel == "push":
            return PushContent(title=self.title.render(context), subtitle=None, body=body)
        return TextContent(body, getattr(self.settings.sender, channel))


def _addresses(user: dict[str, Any], channel: str, settings: Settings) -> tuple[str, ...]:
    return addresses_of(user.get(address_field(channel, settings)))


async def _send_once(provider: Provider, message: Message, address: str, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        try:
            await provider.send(message, address)
            return True
        except DeliveryError:
            return False
    return False


async def transport_ceiling(settings: Settings, population: Population, channels: Sequence[str]) -> BaselineRun:
    texts = _Texts(settings)
    work: dict[str, list[tuple[Message, str]]] = {channel: [] for channel in channels}
    for index in range(population.size):
        user = population.document(index)
        for channel in channels:
            addresses = _addresses(user, channel, settings)
            if addresses:
                message = Message(channel, user["_id"], addresses, texts.content_for(channel, user))
                work[channel].extend((message, address) for address in addresses)
    counts = {"attempted": 0, "sent": 0}
    # The pre-rendered messages live for the whole run: keep the garbage collector from scanning
    # them again and again, which would bill the transport for our preparation.
    gc.collect()
    gc.freeze()
    async with open_providers(settings.providers, settings.channels.providers()) as providers:
        started, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for channel in channels:
                cs = settings.channels[channel]
                # With a rate limit the pipeline is paced by it: pace the ceiling the same way.
                bucket = TokenBucket(cs.rate_per_second, cs.burst) if cs.rate_per_second > 0 else None
                queue = iter(work[channel])  # shared by the workers: each takes the next item
                for _ in range(cs.concurrency):
                    nursery.start_soon(_ceiling_worker, providers[channel], queue, bucket, cs.timeout_seconds, counts)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    gc.unfreeze()
    attempted = counts["attempted"]
    return BaselineRun(
        "ceiling",
        elapsed,
        population.size,
        attempted,
        counts["sent"],
        attempted - counts["sent"],
        False,
        cpu,
        max(settings.channels[c].concurrency for c in channels),
    )


async def _ceiling_worker(
    provider: Provider, queue: Any, bucket: TokenBucket | None, timeout: float, counts: dict[str, int]
) -> None:
    for message, address in queue:
        if bucket is not None:
            await bucket.acquire()
        counts["attempted"] += 1
        if await _send_once(provider, message, address, timeout):
            counts["sent"] += 1


async def naive_loop(settings: Settings, population: Population, channels: Sequence[str], sample: int) -> BaselineRun:
    from pymongo import MongoClient

    users_wanted = min(sample, population.size)
    texts = _Texts(settings)
    attempted = sent = 0
    async with open_providers(settings.providers, settings.channels.providers()) as providers:
        client: MongoClient[dict[str, Any]] = MongoClient(settings.store.url.get_secret_value())
        try:
            started, cpu = time.perf_counter(), time.process_time()
            collection = client[settings.store.database][settings.store.users_collection]

            def query() -> list[dict[str, Any]]:
                # `$in`, as the service asks: the embedded store does not match an array element by equality.
                query = {settings.user_fields.clusters: {"$in": [CLUSTER]}}
                cursor = collection.find(query).sort("_id", 1).limit(users_wanted)
                return list(cursor)

            users = await trio.to_thread.run_sync(query)
            if not users:
                raise RuntimeError("the naive loop's store query returned no users")
            for user in users:
                user["_id"] = str(user["_id"])
                for channel in channels:
                    addresses = _addresses(user, channel, settings)
                    if not addresses:
                        continue
                    message = Message(channel, user["_id"], addresses, texts.content_for(channel, user))
                    for address in addresses:
                        attempted += 1
                        sent += await _send_once(
                            providers[channel], message, address, settings.channels[channel].timeout_seconds
                        )
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            client.close()
    return BaselineRun(
        "naive", elapsed, len(users), attempted, sent, attempted - sent, len(users) < population.size, cpu
    )


def apprise_url(settings: Settings, address: str) -> str:
    smtp = settings.providers.smtp
    return f"mailto://{smtp.host}:{smtp.port}?mode=insecure&from={settings.sender.email}&to={address}&format=text"


def apprise_concurrency(settings: Settings) -> int:
    """The e-mail channel's connections in use at once: what Apprise gets to be fair."""
    return max(1, min(settings.channels["email"].concurrency, settings.providers.smtp.pool_size))


def apprise_emails(settings: Settings, population: Population, sample: int) -> BaselineRun:
    """Blocking: run it in a thread. One fresh Apprise notifier per e-mail, which is how
    personalised mail goes out with Apprise (and keeps its per-instance throttle out of the way),
    from `apprise_concurrency` threads."""
    import apprise

    logging.getLogger("apprise").setLevel(logging.CRITICAL)
    texts = _Texts(settings)
    users: list[dict[str, Any]] = []
    for index in range(population.size):
        if len(users) >= sample:
            break
        if population.email(index) is not None:
            users.append(population.document(index))
    # Import Apprise's plugins before the clock starts: that is start-up, not sending.
    apprise.Apprise.instantiate(apprise_url(settings, "warm-up@example.com"))
    threads = apprise_concurrency(settings)

    def notify(user: dict[str, Any]) -> bool:
        content = texts.content_for("email", user)
        assert isinstance(content, EmailContent)
        notifier = apprise.Apprise.instantiate(apprise_url(settings, user["emailAddress"]))
        return notifier is not None and bool(notifier.notify(body=content.text or "", title=content.subject))

    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="apprise") as pool:
        started, cpu = time.perf_counter(), time.process_time()
        sent = sum(pool.map(notify, users))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    sampled = len(users) < population.with_address("email")
    return BaselineRun("apprise", elapsed, len(users), len(users), sent, len(users) - sent, sampled, cpu, threads)


async def run_baseline(
    kind: str, settings: Settings, population: Population, channels: Sequence[str], sample: int
) -> BaselineRun:
    if kind == "ceiling":
        return await transport_ceiling(settings, population, channels)
    if kind == "naive":
        return await naive_loop(settings, population, channels, sample)
    if kind == "apprise":
        return await trio.to_thread.run_sync(apprise_emails, settings, population, sample)
    raise ValueError(f"unknown baseline {kind!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Child-process entry: settings from the service's TOML file and environment, result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m dispatcher.loadtest.baselines")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--config", required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--channels", required=True)
    parser.add_argument("--sample", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings(args.config)
    run = trio.run(
        run_baseline, args.kind, settings, Population(args.users), tuple(args.channels.split(",")), args.sample
    )
    json.dump(asdict(run), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
