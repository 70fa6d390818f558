"""What one lane has not taken yet of the users the send's one resolver read.

The resolver reads the audience once and hands every batch to every lane. Lanes go at their own
pace (e-mail in seconds, SMS at 1/s for hours), so a lane's backlog can grow to the whole
audience: a `Backlog` keeps its first `in_memory` batches in memory and writes the rest to an
anonymous temporary file (pickled batches, read back in order, the file emptied once read), so
memory holds a few batches per lane whatever the audience, each user is read from the store once,
and every lane sees the same snapshot of the users.

File I/O runs on the event loop: a batch is a few hundred small documents (tens of KB) going to
and from the page cache, microseconds, and only a lagging lane touches the file at all.
"""

from __future__ import annotations

import pickle
import tempfile
from collections import deque
from typing import IO, Generic, NamedTuple, TypeVar

import trio

T = TypeVar("T")


class BacklogStatistics(NamedTuple):
    current_buffer_used: int
    open_send_channels: int
    open_receive_channels: int


class Backlog(Generic[T]):
    """A FIFO of batches that never blocks the writer: past `in_memory` batches, or while older
    ones are still on disk, a batch goes to the spill file."""

    def __init__(self, in_memory: int = 2) -> None:
        self._in_memory = in_memory
        self._memory: deque[T] = deque()
        self._file: IO[bytes] | None = None
        self._read_at = 0
        self._on_disk = 0
        self._closed = False
        self._changed = trio.Event()
        # Batches that went to disk (a figure for benchmarks and tests).
        self.spilled = 0

    @property
    def has_room(self) -> bool:
        """Whether a batch put now stays in memory."""
        return self._on_disk == 0 and len(self._memory) < self._in_memory

    def put(self, batch: T) -> None:
        if self.has_room:
            self._memory.append(batch)
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="dispatcher-backlog-")
            self._file.seek(0, 2)
            pickle.dump(batch, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self._on_disk += 1
            self.spilled += 1
        self._wake()

    def close(self) -> None:
        """No more batches: `get` returns None once the backlog is empty."""
        self._closed = True
        self._wake()

    async def get(self) -> T | None:
        """The oldest batch, waiting for one; None when closed and empty."""
        while True:
            if self._memory:
                batch = self._memory.popleft()
            elif self._on_disk:
                batch = self._read()
            elif self._closed:
                self.discard()
                return None
            else:
                await self._changed.wait()
                continue
            self._wake()  # room for the writer
            return batch

    def discard(self) -> None:
        """Drop everything (the file too)."""
        self._memory.clear()
        self._on_disk = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def changed(self) -> trio.Event:
        """Set at the next change (a batch put or taken, the backlog closed)."""
        return self._changed

    def statistics(self) -> BacklogStatistics:
        """As a trio memory channel's, for the queue-depth metric (`Metrics.track_queue`)."""
        return BacklogStatistics(len(self._memory) + self._on_disk, 0 if self._closed else 1, 1)

    def _read(self) -> T:
        assert self._file is not None
        self._file.seek(self._read_at)
        batch: T = pickle.load(self._file)
        self._read_at = self._file.tell()
        self._on_disk -= 1
        if not self._on_disk:
            # Everything written was read: start the file over instead of growing it.
            self._file.seek(0)
            self._file.truncate()
            self._read_at = 0
        return batch

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
