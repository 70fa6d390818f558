"""The actors of one send: resolver -> renderer -> sender per channel lane, and one collector.

Each actor is a plain async function that takes its channels and collaborators and closes what
it is handed; `supervisor.run_pipeline` wires them in one nursery.
"""

from .supervisor import run_pipeline

__all__ = ["run_pipeline"]
