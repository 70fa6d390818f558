"""CI (`.ci/run`) runs the README's test command as the README writes it: a change to one (the
worker count, say) that is not made to the other fails here, not unnoticed in CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"CI runs exactly this line.*?```sh\n(.*?)\n```", readme, re.DOTALL)
    assert match, "the README names no test command for CI"
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[-1] == match[1]
