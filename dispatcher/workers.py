"""`dispatcher serve --workers N`: N service processes sharing one listening socket.

The supervisor binds the socket (so a busy port fails once, before anything starts), starts the
embedded store once when `[store].url` is empty (every worker must see the same store), and runs
each worker as `dispatcher serve` with the socket inherited. Signals are passed on; a worker that
dies is started again; the supervisor exits when every worker has stopped after a signal. The
workers share their rate limits and fan-outs through Redis, which is why one is required.

Processes die together: the workers and the embedded store are killed by the kernel when the
supervisor dies (`children.die_with_parent`), so a supervisor killed outright leaves nothing
serving the port or holding the store's files. An embedded store that exits is restarted on the
same address (its data persists in `[store].data_dir`); when it cannot be, the supervisor stops
the workers and exits with status 1.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from .settings import Settings

log = logging.getLogger("dispatcher.workers")

_RESTART_PAUSE_SECONDS = 1.0
# Set for each worker: the listening sockets' file descriptors (`dispatcher serve` reads it).
WORKER_FDS_ENV = "DISPATCHER_WORKER_FDS"


def supervise(settings: Settings, sockets: Sequence[socket.socket], workers: int, argv: Sequence[str]) -> int:
    from .children import die_with_parent
    from .embedded_store import EmbeddedServer
    from .errors import StoreError
    from .metrics import clear_multiprocess_dir, mark_process_dead

    env = dict(os.environ)
    fds = [sock.fileno() for sock in sockets]
    for fd in fds:
        os.set_inheritable(fd, True)
    env[WORKER_FDS_ENV] = ",".join(str(fd) for fd in fds)
    scratch = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        # /-/metrics of any worker reports the sum over all of them.
        scratch = tempfile.TemporaryDirectory(prefix="dispatcher-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = scratch.name
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = env["PROMETHEUS_MULTIPROC_DIR"]
    clear_multiprocess_dir()
    store = None
    if not settings.store.url.get_secret_value():
        store = EmbeddedServer(settings.store.data_dir)
        env["MONGODB_URL"] = store.url
    command = [
        sys.executable,
        "-c",
        "from dispatcher.cli import main; raise SystemExit(main())",
        *_without_workers(argv),
    ]
    stopping = 0  # the signal passed on to the workers, once one came
    children: dict[int, subprocess.Popen[bytes]] = {}

    def start() -> None:
        # A session of its own: a Ctrl-C in the terminal reaches the supervisor only, which passes
        # it on once (a second signal would cut a worker's drain short).
        child = subprocess.Popen(command, env=env, pass_fds=fds, start_new_session=True, preexec_fn=die_with_parent())
        # A signal that came while this worker was starting (the restart pause, or before Popen
        # returned) was passed on without it: it gets it here, else the supervisor waits for it
        # forever. Held meanwhile, so that `forward` cannot pass on the same signal a second time.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            children[child.pid] = child
            if stopping:
                child.send_signal(stopping)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        log.info("worker %d started", child.pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = signum
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    status_code = 0
    try:
        for _ in range(workers):
            start()
        while children:
            pid, status = os.wait()
            if store is not None and pid == store.pid and not stopping:
                log.error("the embedded store (pid %d) exited (status %d); restarting it", pid, status)
                try:
                    store.restart()
                except StoreError as exc:
                    log.error("%s; stopping the workers", exc)
                    status_code = 1
                    forward(signal.SIGTERM, None)
                    continue
                log.warning("the embedded store is back (pid %d)", store.pid)
                continue
            child = children.pop(pid, None)
            if child is None:
                continue
            mark_process_dead(pid)
            if not stopping:
                log.error("worker %d exited (status %d); starting another", pid, status)
                time.sleep(_RESTART_PAUSE_SECONDS)
                start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children.values():
            child.kill()
        if store is not None:
            store.stop()
        if scratch is not None:
            scratch.cleanup()
    log.info("stopped")
    return status_code


def _without_workers(argv: Sequence[str]) -> list[str]:
    """The same command line, minus `--workers N` (each worker is one process)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out
