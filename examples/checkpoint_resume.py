"""A checkpointed run, killed at a step, then resumed to the same result.

Six steps each add their number to a running total (and log that they ran, in a file the
caller names, to show which steps ran again). A checkpoint is saved after every step, atomically,
in a directory. With ``--pause-at N``, step N announces itself and hangs, so that a test (or you)
can kill the process with SIGKILL there; ``resume`` then continues from the last saved step.

    python examples/checkpoint_resume.py run DIR RUN_ID [--pause-at N] [--log FILE]
    python examples/checkpoint_resume.py resume DIR RUN_ID [--log FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import threading
from pathlib import Path

from floxide_grpc import FileCheckpointStore, Workflow, node

STEPS = 6
_options = argparse.Namespace(pause_at=None, log=None)


def make_step(n: int) -> object:
    def step(total: int) -> int:
        if _options.log:
            with Path(_options.log).open("a") as log:
                log.write(f"step{n}\n")
        if _options.pause_at == n:
            print(f"paused at step {n}", flush=True)
            threading.Event().wait()  # hang until killed
        return total + n

    step.__name__ = f"step{n}"
    return node(step)


steps = [make_step(n) for n in range(1, STEPS + 1)]
workflow = Workflow("checkpoint_resume", start=steps[0])
for before, after in itertools.pairwise(steps):
    workflow.edge(before, after)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run", "resume"])
    parser.add_argument("directory")
    parser.add_argument("run_id")
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--log")
    args = parser.parse_args(argv, namespace=_options)
    store = FileCheckpointStore(args.directory)
    if args.command == "run":
        result = await workflow.run_with_checkpoint(100, store, args.run_id)
    else:
        result = await workflow.resume(store, args.run_id)
    print(f"result: {result}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
