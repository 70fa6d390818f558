"""`dispatcher serve | seed | check-config | loadtest | jobs | callbacks`: the command line."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import trio

from . import __version__
from .errors import ConfigError, DispatcherError, StoreInUse
from .logs import configure_logging, python_level
from .settings import ENV_PREFIX, ConfigReport, Settings, find_config_file, load_settings_report
from .workers import WORKER_FDS_ENV

if TYPE_CHECKING:
    from .dryrun import DryRun

add_loadtest_parser: Callable[[Any], argparse.ArgumentParser] | None
try:
    from .loadtest.cli import add_parser as add_loadtest_parser
except ImportError:  # an installed wheel: the harness ships with the source tree only (README, "Layout")
    add_loadtest_parser = None

log = logging.getLogger("dispatcher")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Hypercorn's graceful shutdown runs alongside the dispatcher's drain and lasts this much longer,
# so that the answers to sends cancelled at the end of the drain still reach their clients.
RESPONSE_MARGIN_SECONDS = 1.0


class CannotListen(DispatcherError):
    """The server's address cannot be bound (in use, not local, privileged)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line saying what is wrong and where to look, not the usage block.
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return value.upper()


AUTO_WORKERS = 0  # `--workers auto`


def _workers(value: str) -> int:
    if value == "auto":
        return AUTO_WORKERS
    try:
        workers = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of processes (or auto)") from None
    if workers < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return workers


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (0-65535; 0 picks a free one)")
    return port


def _add_config_option(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # In a subcommand the option is SUPPRESSed when absent, so that the global form still applies
    # and, when both are given, the subcommand's value wins.
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS if in_subcommand else None,
        help="TOML configuration (default: $DISPATCHER_CONFIG, else ./config.toml if present, "
        "else the built-in defaults)",
    )


def _add_log_level_option(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=_log_level,
        default=argparse.SUPPRESS if in_subcommand else None,
        help=f"{', '.join(LOG_LEVELS)}, any case (default: [logging].level, else INFO)",
    )


def _add_predecessor_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predecessor-config",
        metavar="FILE",
        help="the Messaging Service's JSON configuration, under the TOML one (default: $CONFIGURATION_PATH)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `dispatcher` parser; `--config` and `--log-level` go before or after the subcommand."""
    parser = _Parser(
        prog="dispatcher",
        description="Multi-channel messaging service",
        epilog="--config and --log-level may also follow the command (its value wins); "
        "'dispatcher COMMAND --help' lists each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_config_option(parser, in_subcommand=False)
    _add_log_level_option(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        _add_config_option(sub, in_subcommand=True)
        _add_log_level_option(sub, in_subcommand=True)
        return sub

    serve_parser = command("serve", "run the HTTP service")
    serve_parser.add_argument("--host", help="address to listen on (overrides [server].host, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=_port, help="port to listen on (overrides [server].port, default 3000)")
    serve_parser.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="service processes sharing the listening socket (default 1; more than 1 needs "
        "[cluster].redis_url, so that the channel limits hold across them); 'auto': one per CPU "
        "available with Redis, else 1",
    )
    _add_predecessor_option(serve_parser)
    seed = command("seed", "load users and templates from a JSON file into the store")
    seed.add_argument("file", type=Path, help='JSON file {"users": [...], "templates": [...]} (MongoDB extended JSON)')
    _add_predecessor_option(command("check-config", "validate the configuration and print it (secrets hidden)"))
    render = command("render", "render a template for one user, as a dry run: nothing is sent or recorded")
    render.add_argument("--template", required=True, metavar="ID", help="the template's id")
    render.add_argument("--user", required=True, metavar="ID", help="the user's id ([user_fields].id)")
    render.add_argument("--data", default="{}", metavar="JSON", help="the request's data object (default {})")
    render.add_argument(
        "--channel",
        action="append",
        default=[],
        help="a channel to render (repeatable; default: every one the template has)",
    )
    _add_predecessor_option(render)
    migrate = command("migrate-config", "print the TOML equivalent of the Messaging Service's JSON configuration")
    migrate.add_argument("file", type=Path, help="the predecessor's configuration (what CONFIGURATION_PATH named)")
    from .remote import add_parsers as add_remote_parsers

    add_remote_parsers(commands, command)
    if add_loadtest_parser is None:
        loadtest = command("loadtest", "not in this installation (the load-test harness ships with the source tree)")
        loadtest.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return parser
    loadtest = add_loadtest_parser(commands)
    # The harness logs at its own --service-log-level; --config is its default --base-config.
    _add_config_option(loadtest, in_subcommand=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "loadtest":
        if add_loadtest_parser is None:
            print(
                "dispatcher loadtest: the load-test harness and its fake providers ship with the source "
                "tree, not the installed package: from a checkout, pip install -e '.[loadtest]'",
                file=sys.stderr,
            )
            return 2
        # The harness generates the service's configuration itself: no load_settings here.
        from .loadtest.cli import run as run_loadtest

        return run_loadtest(args)
    if args.command in ("jobs", "callbacks"):
        # Clients of a running service over HTTP: its configuration is not theirs to read.
        from .remote import run as run_remote

        return run_remote(args)
    try:
        overrides = {}
        if args.command == "serve":
            overrides = {
                f"server.{key}": getattr(args, key) for key in ("host", "port") if getattr(args, key) is not None
            }
        if args.command == "migrate-config":
            from .predecessor import migrate_config

            print(migrate_config(args.file), end="")
            return 0
        settings, report = load_settings_report(
            args.config, overrides=overrides, predecessor=getattr(args, "predecessor_config", None)
        )
        # [logging].format: text, JSON or pino lines; the level from --log-level, else the file.
        configure_logging(settings, args.log_level or python_level(settings.logging.level) or "INFO")
        if args.command in ("serve", "check-config"):
            from .auth import load_api_keys

            load_api_keys(settings.auth)  # an unreadable keys file stops here, naming auth.keys_file
        if args.command == "serve" and os.environ.get(WORKER_FDS_ENV):
            # A worker of `serve --workers N`: the supervisor bound the socket and announced.
            sockets = [socket.socket(fileno=int(fd)) for fd in os.environ[WORKER_FDS_ENV].split(",")]
            trio.run(partial(serve, settings, sockets=sockets))
        elif args.command == "serve":
            if args.workers == AUTO_WORKERS:
                args.workers = auto_workers(settings)
            if args.workers > 1 and not settings.cluster.redis_url.get_secret_value():
                raise ConfigError(
                    f"--workers {args.workers}: needs [cluster].redis_url (or REDIS_URL): without a "
                    "shared Redis each process would apply the channels' rate limits on its own, "
                    f"and {args.workers} processes would send at {args.workers} times the allowed rate"
                )
            # Bound before anything starts (the embedded store above all): a busy port is then one
            # line, with nothing to stop.
            sockets = listen(settings)
            _announce(settings, args.config, report)
            if args.workers > 1:
                from .workers import supervise

                return supervise(settings, sockets, args.workers, sys.argv[1:] if argv is None else list(argv))
            trio.run(partial(serve, settings, sockets=sockets))
        elif args.command == "render":
            from .wire import dry_run_json

            try:
                data = json.loads(args.data)
            except ValueError as exc:
                raise ConfigError(f"--data: not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError("--data: must be a JSON object")
            answer = trio.run(render_template, settings, args.template, args.user, data, args.channel)
            print(json.dumps(dry_run_json(answer), indent=2, ensure_ascii=False))
        elif args.command == "seed":
            trio.run(seed_store, settings, args.file)
        elif args.command == "check-config":
            _announce(settings, args.config, report)
            for key, origin in report.sources.items():
                log.info("%s from %s", key, origin)
            print(json.dumps(effective_settings(settings), indent=2))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - unwrapping the nurseries' groups
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return 130
        if not all(isinstance(leaf, DispatcherError) for leaf in leaves):
            raise
        for leaf in leaves:
            prefix = "configuration error" if isinstance(leaf, ConfigError) else "error"
            print(f"{prefix}: {leaf}", file=sys.stderr)
        return 2 if any(isinstance(leaf, (ConfigError, CannotListen, StoreInUse)) for leaf in leaves) else 1
    return 0


def auto_workers(settings: Settings) -> int:
    """`--workers auto`: one process per CPU this process may run on, when Redis lets them share
    the channel limits; one process without Redis (said in the log, not refused: the container
    image runs `--workers auto` whether or not Redis is configured)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not settings.cluster.redis_url.get_secret_value():
        if cpus > 1:
            log.info("--workers auto: 1 process (%d CPUs, but several processes need [cluster].redis_url)", cpus)
        return 1
    log.info("--workers auto: %d processes (one per CPU available)", cpus)
    return cpus


def effective_settings(settings: Settings) -> dict[str, Any]:
    """The configuration as `check-config` prints it: what applies, not what was left unset
    (a channel's `on_ambiguous` falls back to the channel's own policy)."""
    dumped = settings.model_dump(mode="json")
    for channel in settings.channels.per_channel:
        if isinstance(dumped["channels"].get(channel), dict):
            dumped["channels"][channel]["on_ambiguous"] = settings.channels.on_ambiguous(channel)
    return dumped


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def listen(settings: Settings) -> list[socket.socket]:
    """Bind `[server].host:port` as hypercorn would; `CannotListen` says what to do instead."""
    host, port = settings.server.host, settings.server.port
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    config = _hypercorn_config(settings)
    config.bind = [address]
    try:
        return config.create_sockets().insecure_sockets
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRINUSE:
            advice = "stop the process that holds it, or choose another port (--port or [server].port)"
        else:
            advice = "choose another address (--host/--port or [server].host/port)"
        raise CannotListen(f"cannot listen on {address}: {reason}; {advice}") from None


def _announce(settings: Settings, config_arg: str | None, report: ConfigReport | None = None) -> None:
    """One line each: the configuration file, the store, the provider of each active channel,
    and every notice of the configuration (predecessor keys and variables unused here)."""
    overridden = sorted(name for name in os.environ if name.startswith(ENV_PREFIX))
    path = report.toml if report is not None else find_config_file(config_arg)
    source = f"configuration: {path}" if path else "configuration: no ./config.toml, built-in defaults apply"
    if report is not None and report.predecessor is not None:
        source = f"configuration: {path or 'no TOML file'} over the Messaging Service's {report.predecessor}"
    log.info("%s%s", source, f" (overridden by {', '.join(overridden)})" if overridden else "")
    for notice in report.notices if report is not None else ():
        log.warning("%s", notice)
    log.info("store: %s", describe_store(settings))
    log.info(
        "channels: %s",
        ", ".join(f"{channel} via {_describe_provider(settings, channel)}" for channel in settings.channels.active),
    )


def describe_store(settings: Settings) -> str:
    """Where users and templates are read from, without credentials."""
    url = settings.store.url.get_secret_value()
    if not url:
        return f"embedded, data in {settings.store.data_dir / 'store.db'}"
    try:
        parts = urlsplit(url)
        where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    except ValueError:
        where = "an unparsable URL"
    origin = "MONGODB_URL" if os.environ.get("MONGODB_URL") else "[store].url"
    return f"{where} (from {origin}), database {settings.store.database}"


def _describe_provider(settings: Settings, channel: str) -> str:
    name = settings.channels[channel].provider
    providers = settings.providers
    detail = {
        "outbox": lambda: str(providers.outbox.dir / channel),
        "smtp": lambda: f"{providers.smtp.host}:{providers.smtp.port}, {providers.smtp.security}",
        "fcm": lambda: f"project {providers.fcm.project_id}",
    }.get(name)
    return f"{name} ({detail()})" if detail else name


def _hypercorn_config(settings: Settings) -> Any:
    from hypercorn.config import Config

    class ServerConfig(Config):
        # Read by the patched stream start below (`_refuse_100_continue_for_bodies_too_large`).
        dispatcher_max_body_bytes: int | None = None

    config = ServerConfig()
    config.bind = [f"{settings.server.host}:{settings.server.port}"]
    config.accesslog = None
    # Through the root logger (one format, one line), without its own "Running on" line: the
    # service announces the address itself.
    error_logger = logging.getLogger("hypercorn.error")
    if _quiet_startup not in error_logger.filters:
        error_logger.addFilter(_quiet_startup)
    config.errorlog = error_logger
    config.graceful_timeout = settings.dispatcher.drain_timeout_seconds + RESPONSE_MARGIN_SECONDS
    config.dispatcher_max_body_bytes = settings.server.max_body_bytes
    _refuse_100_continue_for_bodies_too_large()
    return config


def _refuse_100_continue_for_bodies_too_large() -> None:
    """A request with `Expect: 100-continue` and a `Content-Length` over the body limit gets its
    413 at once, never `100 Continue` (which invites the client to send the body).

    hypercorn (0.18) sends `100 Continue` from its connection loop as soon as the request head is
    parsed, before the application runs, and has no setting for it: for such a request we clear
    h11's "client is waiting for 100" flag before the stream starts, and the application answers
    413 from the Content-Length alone. Only servers whose configuration carries
    `dispatcher_max_body_bytes` (ours) are affected.
    """
    from hypercorn.protocol.h11 import H11Protocol

    original = H11Protocol._create_stream
    if getattr(original, "_dispatcher_patched", False):
        return

    async def _create_stream(self: Any, request: Any) -> None:
        limit = getattr(self.config, "dispatcher_max_body_bytes", None)
        if limit is not None and self.connection.they_are_waiting_for_100_continue:
            length = next((v for n, v in request.headers if n.lower() == b"content-length"), b"")
            if length.strip().isdigit() and int(length) > limit:
                self.connection.client_is_waiting_for_100_continue = False
        await original(self, request)

    _create_stream._dispatcher_patched = True  # type: ignore[attr-defined]
    H11Protocol._create_stream = _create_stream  # type: ignore[method-assign]


def _quiet_startup(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Running on ")


async def serve(
    settings: Settings,
    *,
    sockets: list[socket.socket] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT; `sockets` are the bound listening sockets (see `listen`).

    Shutdown is one window of `[dispatcher].drain_timeout_seconds`: at the signal, hypercorn stops
    accepting and the dispatcher starts draining at the same moment; sends still running at the
    end of the window are cancelled and their clients answered, for which hypercorn's own graceful
    shutdown lasts `RESPONSE_MARGIN_SECONDS` longer.
    """
    from hypercorn.trio import serve as hypercorn_serve

    from .app import create_app

    config = _hypercorn_config(settings)
    # Hypercorn takes already-bound sockets as file descriptors.
    config.bind = [f"fd://{sock.detach()}" for sock in (sockets if sockets is not None else listen(settings))]
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stop)
        dispatcher = await nursery.start(_run_dispatcher, settings, stop)
        urls = await nursery.start(
            partial(
                hypercorn_serve,
                _complete_responses(create_app(dispatcher)),
                config,
                shutdown_trigger=stop.wait,
                mode="asgi",
            )
        )
        log.info("listening on %s", ", ".join(urls))
        task_status.started(urls)
    log.info("stopped")


async def _run_dispatcher(
    settings: Settings, stop: trio.Event, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    from .core import open_dispatcher

    # A task beside hypercorn, not a block around it: leaving `open_dispatcher` is what drains the
    # sends (and cancels them at the end of the window), and it must start at the signal, not once
    # hypercorn's own graceful wait is over.
    async with open_dispatcher(settings) as dispatcher:
        task_status.started(dispatcher)
        await stop.wait()
        log.info(
            "shutting down: draining %d sends in flight (at most %gs)",
            dispatcher.in_flight,
            settings.dispatcher.drain_timeout_seconds,
        )


def _complete_responses(app: Any) -> Any:
    """Shield the last `send` of each HTTP response.

    Quart-Trio cancels a request's task as soon as hypercorn, handling that last send, reports the
    request as disconnected; the cancellation lands in the middle of hypercorn's own bookkeeping of
    the connection (recycle it, or close it once shutdown has begun). A connection whose send was
    answered during the drain then stayed open until the graceful timeout, holding the process.
    Hypercorn already shields its socket writes; this covers the rest of that send.
    """

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def complete_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await app(scope, receive, complete_send)

    return asgi


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop.set()
            return


async def render_template(
    settings: Settings, template_id: str, user_id: str, data: dict[str, Any], channels: Sequence[str] = ()
) -> DryRun:
    """`dispatcher render`: the dry run of one template for one user, on `channels` (default: the
    active channels the template has text for). Opens the store without the ledger and without
    Redis, so that nothing is resumed, sent or recorded meanwhile."""
    from pydantic import SecretStr

    from .core import open_dispatcher
    from .errors import RequestError
    from .plan import has_text_for

    quiet = settings.model_copy(
        update={
            "store": settings.store.model_copy(update={"ledger": False}),
            "cluster": settings.cluster.model_copy(update={"redis_url": SecretStr("")}),
        }
    )
    async with open_dispatcher(quiet) as dispatcher:
        if not channels:
            template = await dispatcher.store.find_template(template_id)
            if template is None:
                raise RequestError(f"templateId: no template {template_id!r}")
            channels = [c for c in settings.channels.active if has_text_for(template, c)]
            if not channels:
                raise RequestError(f"templateId: the template has no text for any active channel ({template_id!r})")
        request = {"channels": list(channels), "recipients": [user_id], "templateId": template_id, "data": data}
        return await dispatcher.dry_run(request, preview_users=1)


async def seed_store(settings: Settings, path: Path) -> None:
    """Upsert the file's users and templates by `_id` (re-seeding is harmless)."""
    from bson import json_util

    from .embedded_store import open_embedded_store
    from .store import seed_documents

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
