"""Rendering that can run away, in worker processes under CPU and memory limits.

A template that is not `Text.inline` (a loop, a macro, arithmetic...) is rendered here: a chunk of
users per hop into a `trio_parallel` worker process, the request's `data` pickled once per chunk.
In the worker, for each user:

- a CPU-time timer (`ITIMER_PROF`, the worker's own CPU: a busy machine does not charge it for
  other processes) of `budget` interrupts the rendering between two Python operations; the
  worker's main thread receives the signal, as Python delivers every signal, so no exception is
  ever injected into a thread. The user's texts fail with `RenderBudgetExceeded`;
- a second timer (`ITIMER_VIRTUAL`, its signal left to the kernel's default action: the process
  dies) stops a single C-level operation that does not come back to Python code in time;
- the address space is limited (`RLIMIT_AS`, what the worker had when it started plus
  `memory_bytes`): an allocation past it is a `MemoryError`, that user's delivery fails.

A worker that was interrupted, ran out of memory or died is not used again: trio_parallel's
`retire` hook retires it after the job, or it is gone, and a fresh one takes the next chunk. A
chunk whose worker died is rendered again one user per worker, so that only the users whose
rendering kills a worker fail (`RenderBudgetExceeded`). The parent also stops waiting (and kills
the worker) after a generous wall-clock cap, in case a worker stops without using CPU.

Workers are shared by the whole process (trio_parallel's default context, at most one per CPU at a
time) and outlive sends: a template compiles once per worker (an LRU cache, as in the parent). They
start when a send first needs one (about a second of CPU, once): a service whose templates all
render inline never starts them.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
from collections.abc import Sequence
from typing import Any

import trio
import trio_parallel

from actors.faults import RenderOverrun

from .errors import RenderError
from .messages import Delivery, Message, User
from .plan import ChannelPlan
from .templating import Renderer, Text

# Beyond the budget, how much more CPU a single C-level operation may use before the kernel stops
# the worker (the interrupt cannot reach it in C code).
HARD_FACTOR = 2.0
HARD_EXTRA_SECONDS = 0.05
# Wall-clock cap of a chunk, per user, as a multiple of the hard limit, plus a fixed margin: large
# on purpose, a worker waits for the CPU behind other processes on a loaded machine (the CPU
# limits above are what stops a template; this only catches a worker that stopped).
WALL_FACTOR = 50.0
WALL_EXTRA_SECONDS = 10.0
# An idle worker exits after this long (a new one starts in ~0.1-0.3 s).
IDLE_TIMEOUT = 600.0


class RenderBudgetExceeded(RenderError, RenderOverrun):
    """A rendering ran longer than its CPU budget, or its worker had to be stopped; that delivery
    fails."""

    def __init__(self, budget_seconds: float) -> None:
        super().__init__(f"template error: rendering took longer than {budget_seconds * 1000:g} ms")
        self.budget_seconds = budget_seconds


# -- in the worker process -----------------------------------------------------------------------


class _Overrun(BaseException):
    """Raised by the SIGPROF handler. A BaseException, so that no `except Exception` on the way
    (Jinja's, a helper's) turns it into an ordinary error."""


_renderers: dict[tuple[str, int, int], Renderer] = {}
_memory_limit: int | None = None
_armed = False
_retire = False

# What a worker sends back per user and text.
_OVERRUN = 0


def _on_sigprof(signum: int, frame: Any) -> None:
    if _armed:
        raise _Overrun


def _limit_memory(memory_bytes: int) -> None:
    global _memory_limit
    if _memory_limit is not None:
        return
    # What the worker maps once started (the interpreter, Jinja, Babel), plus the allowance.
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    _memory_limit = mapped + memory_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        _memory_limit = min(_memory_limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (_memory_limit, hard))
    signal.signal(signal.SIGPROF, _on_sigprof)
    signal.signal(signal.SIGVTALRM, signal.SIG_DFL)


def _arm(budget: float) -> None:
    global _armed
    _armed = True
    signal.setitimer(signal.ITIMER_VIRTUAL, budget * HARD_FACTOR + HARD_EXTRA_SECONDS)
    signal.setitimer(signal.ITIMER_PROF, budget)


def _disarm() -> None:
    global _armed
    _armed = False  # first: a SIGPROF already on its way is ignored
    signal.setitimer(signal.ITIMER_PROF, 0)
    signal.setitimer(signal.ITIMER_VIRTUAL, 0)


def render_in_worker(
    config: tuple[str, int, int],
    texts: Sequence[tuple[str, bool]],
    data: dict[str, Any],
    users: Sequence[dict[str, Any]],
    budget: float,
    memory_bytes: int,
) -> list[list[str | RenderError | int]]:
    """Runs in a worker: render `texts` (Jinja source, html) for each of `users`, each user's
    texts within `budget` seconds of CPU. Per user and text: the text, the `RenderError`, or
    `_OVERRUN`."""
    global _retire
    _limit_memory(memory_bytes)
    renderer = _renderers.get(config)
    if renderer is None:
        default_locale, max_template_chars, max_rendered_chars = config
        renderer = _renderers[config] = Renderer(
            default_locale=default_locale, max_template_chars=max_template_chars, max_rendered_chars=max_rendered_chars
        )
    # Compiled before any timer runs: compiling is not rendering.
    functions = [renderer.render_function(source, html) for source, html in texts]
    results: list[list[str | RenderError | int]] = []
    for user in users:
        context = {"user": user, "data": data}
        outcome: list[str | RenderError | int] = []
        try:
            try:
                _arm(budget)
                for render in functions:
                    try:
                        outcome.append(render(context))
                    except RenderError as exc:
                        outcome.append(RenderError(str(exc)))
            finally:
                _disarm()
        except _Overrun:
            # Wherever it landed, this process is not trusted again.
            _retire = True
            outcome = [_OVERRUN] * len(functions)
        if any(isinstance(o, RenderError) and "out of memory" in str(o) for o in outcome):
            _retire = True
        results.append(outcome)
    return results


def _should_retire() -> bool:
    return _retire


# Forkserver: a replacement for a stopped worker forks from a small server process instead of
# starting an interpreter (spawn), and nothing of the parent's state (threads, sockets) is
# inherited (fork).
# The forkserver imports this module (Jinja, Babel) once; each worker forks with it loaded.
multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
trio_parallel.configure_default_context(
    idle_timeout=IDLE_TIMEOUT, retire=_should_retire, worker_type=trio_parallel.WorkerType.FORKSERVER
)


# -- in the service ------------------------------------------------------------------------------


class RenderPool:
    """Renders texts that can run away in worker processes (see the module's docstring)."""

    def __init__(self, renderer_config: tuple[str, int, int], budget_seconds: float, memory_bytes: int) -> None:
        if not budget_seconds > 0:
            raise ValueError("budget_seconds must be positive")
        self.config = renderer_config
        self.budget = budget_seconds
        self.memory_bytes = memory_bytes
        self.chunks = 0  # worker hops made: what tests and benchmarks look at

    async def render_users(
        self, plan: ChannelPlan, users: Sequence[User], data: dict[str, Any]
    ) -> list[Message | Delivery | RenderBudgetExceeded]:
        """Each user's message for `plan` (or its skipped/failed delivery, or the overrun). The
        texts that are `inline` render here, on the event loop; the others in one worker hop for
        the users that have an address (none when the plan has no such text)."""
        isolated = plan.isolated
        rendered: list[dict[Text, str | RenderError]] = []
        needing: list[int] = []
        if isolated:
            needing = [i for i, user in enumerate(users) if plan.needs_rendering(user)]
            rendered = await self.render(isolated, data, [users[i] for i in needing])
        per_user: dict[int, dict[Text, str | RenderError]] = dict(zip(needing, rendered))
        outcomes: list[Message | Delivery | RenderBudgetExceeded] = []
        for i, user in enumerate(users):
            try:
                message = plan.message_for(user, data, per_user.get(i))
            except RenderBudgetExceeded as exc:
                outcomes.append(exc)
                continue
            except RenderError as exc:
                outcomes.append(Delivery(plan.id_of(user), plan.channel, "failed", str(exc), kind="render"))
                continue
            outcomes.append(message if message is not None else Delivery(plan.id_of(user), plan.channel, "skipped"))
        return outcomes

    async def render(
        self, texts: Sequence[Text], data: dict[str, Any], users: Sequence[dict[str, Any]]
    ) -> list[dict[Text, str | RenderError]]:
        """Render `texts` for each of `users` in a worker; per user, each text's outcome (a user
        whose rendering overran has `RenderBudgetExceeded` for every text)."""
        if not users or not texts:
            return [{} for _ in users]
        sources = [(text.source, text.html) for text in texts]
        try:
            raw = await self._run(sources, data, users)
        except trio_parallel.BrokenWorkerError:
            if len(users) == 1:
                raw = [[_OVERRUN] * len(texts)]
            else:
                # Find out whose rendering stops a worker: one user per worker.
                raw = []
                for user in users:
                    try:
                        raw.extend(await self._run(sources, data, [user]))
                    except trio_parallel.BrokenWorkerError:
                        raw.append([_OVERRUN] * len(texts))
        overrun = RenderBudgetExceeded(self.budget)
        return [
            {text: overrun if result == _OVERRUN else result for text, result in zip(texts, per_user)}  # type: ignore[misc]
            for per_user in raw
        ]

    async def _run(
        self, sources: list[tuple[str, bool]], data: dict[str, Any], users: Sequence[dict[str, Any]]
    ) -> list[list[str | RenderError | int]]:
        self.chunks += 1
        hard = self.budget * HARD_FACTOR + HARD_EXTRA_SECONDS
        with trio.move_on_after(len(users) * hard * WALL_FACTOR + WALL_EXTRA_SECONDS) as scope:
            return await trio_parallel.run_sync(
                render_in_worker,
                self.config,
                sources,
                data,
                list(users),
                self.budget,
                self.memory_bytes,
                kill_on_cancel=True,
            )
        assert scope.cancelled_caught
        raise trio_parallel.BrokenWorkerError("the render worker did not answer in time and was stopped")


__all__ = ["RenderBudgetExceeded", "RenderPool", "render_in_worker"]
