"""The live display while a phase runs: deliveries per second per channel, as the fakes count
them, refreshed four times a second from a Trio task (no refresh thread)."""

from __future__ import annotations

from collections import deque

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .drivers import PhaseStatus
from .metrics import ProcessSampler
from .receipts import ReceiptTap

REFRESH_SECONDS = 0.25
# Without the display, the tap is still brought up to date now and then, so that no one answer
# of the fakes' process carries a whole run's receipts.
QUIET_REFRESH_SECONDS = 1.0


class ProgressDisplay:
    """Shows `status` (the running phase) and the tap's counts; `enabled=False` only refreshes the
    tap, less often."""

    def __init__(
        self,
        console: Console,
        tap: ReceiptTap,
        channels: tuple[str, ...],
        rss: ProcessSampler | None,
        *,
        enabled: bool = True,
    ) -> None:
        self.console = console
        self.tap = tap
        self.channels = channels
        self.rss = rss
        self.enabled = enabled
        self.status = PhaseStatus("starting")
        self._history: deque[tuple[float, dict[str, int]]] = deque()

    def set_phase(self, status: PhaseStatus) -> None:
        self.status = status
        self._history.clear()

    def _render(self) -> Group:
        now = trio.current_time()
        counts = {channel: self.tap.count(channel) for channel in self.channels}
        self._history.append((now, counts))
        while len(self._history) > 1 and now - self._history[0][0] > 1.0:
            self._history.popleft()
        then, before = self._history[0]
        span = now - then
        status = self.status
        elapsed = now - status.started if status.started else 0.0
        header = Text.assemble(("phase ", "dim"), (status.name, "bold"), ("  elapsed ", "dim"), f"{elapsed:6.1f}s")
        if status.requests_total > 1:
            header.append_text(
                Text.assemble(
                    ("  requests ", "dim"),
                    f"{status.requests_done}/{status.requests_total}",
                    ("  errors ", "dim"),
                    str(status.request_errors),
                )
            )
        if self.rss is not None and self.rss.peak:
            header.append_text(Text.assemble(("  peak RSS ", "dim"), f"{self.rss.peak / 2**20:.0f} MB"))
        table = Table(box=None, pad_edge=False)
        table.add_column("channel")
        table.add_column("received", justify="right")
        table.add_column("deliveries/s (last 1 s)", justify="right")
        for channel in self.channels:
            rate = (counts[channel] - before[channel]) / span if span > 0 else 0.0
            table.add_row(channel, f"{counts[channel]:,}", f"{rate:,.0f}")
        return Group(header, table)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.enabled:
            task_status.started()
            while True:
                await trio.sleep(QUIET_REFRESH_SECONDS)
                await self.tap.refresh()
        await self.tap.refresh()
        with Live(self._render(), console=self.console, auto_refresh=False, transient=True) as live:
            task_status.started()
            while True:
                await trio.sleep(REFRESH_SECONDS)
                await self.tap.refresh()
                live.update(self._render(), refresh=True)
