"""How many times the event loop runs a task, and waits for I/O, per single-recipient send through
`Dispatcher.send`, one send at a time: counts, not timings, so they repeat exactly from run to
run and a change to a send's path shows as a whole number.

    python benchmarks/loop_passes.py [on|off] [SENDS]      # defaults: on 200

At 100 req/s each send mostly has the process to itself, and every pass of the loop it waits for
is a wake-up from idle: ~0.1–0.3 ms of CPU in Trio (docs/benchmarks.md P). Prints the steps per
send by task, and where the send's own task (`Jobs._execute`) was suspended each time, by the
innermost frames of this project. Same set-up as `send_cpu.py` (its null provider, the embedded
store).
"""

from __future__ import annotations

import argparse
import collections

import trio

from send_cpu import open_null_dispatcher, request


class Passes(trio.abc.Instrument):
    def __init__(self) -> None:
        self.counting = False
        self.steps: collections.Counter[str] = collections.Counter()
        self.suspended_at: collections.Counter[str] = collections.Counter()
        self.io_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.counting:
            self.steps[task.name.rsplit(".", 1)[-1] if "<" not in task.name else task.name] += 1

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self.counting or not task.name.endswith("_execute"):
            return
        frames = []
        coro: object = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                path = frame.f_code.co_filename
                if "/dispatcher/" in path or "/actors/" in path:
                    frames.append(f"{'/'.join(path.rsplit('/', 2)[-2:])}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        self.suspended_at[" > ".join(frames[-3:]) or "(ended)"] += 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += self.counting


async def main(ledger: bool, sends: int) -> None:
    async with open_null_dispatcher(ledger, sends + 50, warm_up=50) as d:
        passes = Passes()
        trio.lowlevel.add_instrument(passes)
        passes.counting = True
        for i in range(50, 50 + sends):
            await d.send(request(i))
        passes.counting = False
    print(
        f"ledger {'on' if ledger else 'off'}: {sum(passes.steps.values()) / sends:.2f} task steps a send, "
        f"{passes.io_waits / sends:.2f} I/O waits"
    )
    for name, n in passes.steps.most_common(8):
        print(f"  {n / sends:6.2f}  steps of {name}")
    for where, n in passes.suspended_at.most_common(8):
        print(f"  {n / sends:6.2f}  _execute suspended at {where}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("ledger", nargs="?", choices=["on", "off"], default="on")
    parser.add_argument("sends", nargs="?", type=int, default=200)
    args = parser.parse_args()
    trio.run(main, args.ledger == "on", args.sends)
