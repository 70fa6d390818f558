"""The failures the actors tell apart; `dispatcher.errors` derives its own from these."""

from __future__ import annotations


class StoreFault(Exception):
    """The store (users or the ledger) cannot be reached: the run stops starting deliveries."""


class RenderFault(Exception):
    """A rendering failed for one user: that delivery fails, the others go on."""


class RenderOverrun(RenderFault):
    """A rendering ran longer than its budget. Counted by the renderer: a template that overruns
    for a few users will for all of them."""
