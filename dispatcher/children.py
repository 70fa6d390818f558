"""Child processes that die with their parent.

The service starts processes of its own (the embedded store; the workers of `serve --workers N`).
When the parent is killed outright (SIGKILL, the OOM killer) it cannot stop them, and a child left
behind keeps the store's files or the listening port for the next start. On Linux each child asks
the kernel for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`).

The kernel sends that signal when the *thread* that forked the child exits, not the process:
children must be started from the main thread (or one that lives as long as the process), never
from a worker thread such as `trio.to_thread`'s, which exit after a few idle seconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: between fork and exec only async-signal-safe work is prudent.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child is killed when this process dies.

    A parent that died between fork and `prctl` would never signal: the child then checks that
    its parent is still the one that forked it, and exits otherwise.
    """
    parent = os.getpid()

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def python_environment(base: Mapping[str, str]) -> dict[str, str]:
    """`base` with this package importable from where this process imported it (a checkout not
    installed, or another worktree than the installed one), for a `python -m dispatcher...` child."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**base, "PYTHONPATH": os.pathsep.join(filter(None, [root, base.get("PYTHONPATH")]))}


__all__ = ["die_with_parent", "python_environment"]
