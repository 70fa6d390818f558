"""`dispatcher loadtest`: a load-test harness that runs the service against fake providers.

From a Trio program (or a test): `results = await run_loadtest(LoadTestOptions(...))`; it
returns the results it also writes as JSON. Importing this package stays cheap (the main command
line registers the subcommand on every start): the harness itself loads on first use.
"""

from __future__ import annotations

from typing import Any

from .options import ErrorMix, LoadTestOptions, OptionError

__all__ = ["ErrorMix", "LoadTestError", "LoadTestOptions", "OptionError", "run_loadtest"]


def __getattr__(name: str) -> Any:
    if name in ("run_loadtest", "LoadTestError"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
