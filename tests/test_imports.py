"""The import graph runs one way: `dispatcher.core` imports the actors, and nothing the actors
import pulls in `core`. Each check runs in a fresh interpreter, so no test's imports help it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_fresh(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_actors_import_alone_without_core() -> None:
    run_fresh(
        "import sys, actors\n"
        "assert callable(actors.run_pipeline)\n"
        "assert 'dispatcher.core' not in sys.modules, 'actors imported dispatcher.core'\n"
    )


@pytest.mark.parametrize(
    "module",
    ["dispatcher.messages", "dispatcher.channels", "dispatcher.plan", "dispatcher.delivery", "dispatcher.models"],
)
def test_pipeline_module_imports_without_core(module: str) -> None:
    run_fresh(
        f"import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"assert 'dispatcher.core' not in sys.modules, {module!r} + ' imported dispatcher.core'\n"
    )


def test_package_exports_resolve_lazily() -> None:
    run_fresh(
        "import sys, dispatcher\n"
        "assert 'dispatcher.core' not in sys.modules, 'import dispatcher is not lazy'\n"
        "assert dispatcher.Dispatcher.__name__ == 'Dispatcher'\n"
        "assert callable(dispatcher.open_dispatcher)\n"
        "missing = [n for n in dispatcher.__all__ if getattr(dispatcher, n, None) is None]\n"
        "assert not missing, missing\n"
    )
