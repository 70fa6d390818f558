"""The failures the actors tell apart; `dispatcher.errors` derives its own from these."""

from __future__ import annotations


class RunFault(Exception):
    """Something every delivery of the run needs is gone: the run stops starting deliveries (those
    in flight finish) and leaves the rest to a resumed run, which sends what is not settled."""


class StoreFault(RunFault):
    """The store (users or the ledger) cannot be reached."""


class LimiterFault(RunFault):
    """A channel's limiter (the cluster's Redis) stayed unreachable for a delivery's whole wait."""


class RenderFault(Exception):
    """A rendering failed for one user: that delivery fails, the others go on."""


class RenderOverrun(RenderFault):
    """A rendering ran longer than its budget. Counted by the renderer: a template that overruns
    for a few users will for all of them."""
