"""`dispatcher serve | seed | check-config | loadtest`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from .errors import ConfigError, DispatcherError
from .loadtest.cli import add_parser as add_loadtest_parser
from .settings import Settings, load_settings

log = logging.getLogger("dispatcher")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dispatcher", description="Multi-channel messaging service")
    parser.add_argument("--config", help="TOML configuration (default: $DISPATCHER_CONFIG or ./config.toml)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP service")
    seed = commands.add_parser("seed", help="load users and templates from a JSON file into the store")
    seed.add_argument("file", type=Path, help='JSON file {"users": [...], "templates": [...]} (MongoDB extended JSON)')
    commands.add_parser("check-config", help="validate the configuration and print it (secrets hidden)")
    add_loadtest_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "loadtest":
        # The harness generates the service's configuration itself: no load_settings here.
        from .loadtest.cli import run as run_loadtest

        return run_loadtest(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs one INFO line per request: per delivery, far too much for a service log.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        settings = load_settings(args.config)
        if args.command == "serve":
            trio.run(serve, settings)
        elif args.command == "seed":
            trio.run(seed_store, settings, args.file)
        elif args.command == "check-config":
            print(json.dumps(settings.model_dump(mode="json"), indent=2))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except DispatcherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def serve(settings: Settings, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, drain the sends in flight and exit."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    from .app import create_app
    from .core import open_dispatcher

    config = Config()
    config.bind = [f"{settings.server.host}:{settings.server.port}"]
    config.accesslog = None
    # Let responses of sends that are finishing reach their clients during the drain.
    config.graceful_timeout = settings.dispatcher.drain_timeout_seconds
    stop = trio.Event()
    async with open_dispatcher(settings) as dispatcher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, stop)
            urls = await nursery.start(lambda task_status: hypercorn_serve(
                create_app(dispatcher), config, shutdown_trigger=stop.wait, task_status=task_status))
            log.info("listening on %s", ", ".join(urls))
            task_status.started(urls)
            await stop.wait()
            log.info("shutting down: draining %d sends in flight", dispatcher.in_flight)
    log.info("stopped")


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop.set()
            return


async def seed_store(settings: Settings, path: Path) -> None:
    """Upsert the file's users and templates by `_id` (re-seeding is harmless)."""
    from bson import json_util

    from .store import seed_documents
    from .embedded_store import open_embedded_store

    try:
        document: Any = json_util.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DispatcherError(f"{path}: {exc}") from None
    url = settings.store.url.get_secret_value()
    if url:
        counts = await trio.to_thread.run_sync(seed_documents, url, settings.store, document)
    else:
        async with open_embedded_store(settings.store.data_dir) as url:
            counts = await trio.to_thread.run_sync(seed_documents, url, settings.store, document)
    print(f"seeded {counts['users']} users and {counts['templates']} templates")
