"""W1's workflow: 10 steps, each returns its input + 1 (run i from input i ends at i + 10)."""

from __future__ import annotations

from floxide_grpc import Workflow, node

STEPS = 10


@node
def step(x: int) -> int:
    return x + 1


workflow = Workflow("chain10", start=step)
_previous = "step"
for _n in range(2, STEPS + 1):
    _name = workflow.add(step, name=f"step{_n}")
    workflow.edge(_previous, _name)
    _previous = _name
