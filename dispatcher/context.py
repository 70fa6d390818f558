"""What running a planned send needs, shared by the job runner (`core`) and the shared fan-out
(`fanout`): the user store, one transport per channel, the size of the queues between actors,
the budgeted renderer and each channel's policy for attempts whose outcome is unknown."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from actors import run_pipeline
from actors.journal import Unrecorded
from actors.messages import SendResult
from actors.ports import RenderJobs

from . import metrics
from .delivery import Transport
from .plan import RequestPlan
from .store import Store


@dataclass(slots=True)
class RunContext:
    store: Store
    transports: Mapping[str, Transport]
    queue_size: int
    render_jobs: RenderJobs
    # By channel: "report" or "resend" (`[channels.X].on_ambiguous`).
    on_ambiguous: Mapping[str, str]

    @property
    def settle_within(self) -> dict[str, float]:
        """By channel, how long a live run takes at most to settle a delivery it claimed: the
        attempt's timeout (plus the backoff where ambiguous attempts are resent) and 5 s for the
        outcome's write (`journal.Journal`)."""
        return {
            channel: t.policy.timeout + (t.policy.cap if t.policy.on_ambiguous == "resend" else 0.0) + 5.0
            for channel, t in self.transports.items()
        }

    async def run(
        self, plan: RequestPlan, result: SendResult | None = None, journal: Unrecorded | None = None
    ) -> SendResult:
        """Deliver `plan` through the actors (`actors.run_pipeline`), reporting to the metrics."""
        return await run_pipeline(
            plan, self.store, self.transports, self.queue_size, result, journal, self.render_jobs, metrics
        )
