"""The actors of one send: resolver -> renderer -> sender per channel lane, and one collector.

Each actor is a plain async function that takes its channels and collaborators and closes what
it is handed; `supervisor.run_pipeline` wires them in one nursery. This package is the bottom of
the house: it imports the standard library and trio, nothing of `dispatcher`. What it needs from
outside (users, lanes, transports, a journal, metrics) it names in `ports.py` and `journal.py`;
`dispatcher` implements those and hands them in.
"""

from .supervisor import run_pipeline

__all__ = ["run_pipeline"]
