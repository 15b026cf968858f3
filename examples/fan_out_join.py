"""Fan-out to N items and an exact join.

``split`` turns ``n`` into the items ``1..n`` (NextAll); ``square`` runs once per item; the join
node ``total`` runs once, when the last branch has arrived, with all the squares in index order.
Odd branches also count themselves in the context (an ADD field).

    python examples/fan_out_join.py
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from floxide_grpc import LocalRunner, Merge, NextAll, NodeContext, Workflow, node


@dataclass
class Counts:
    odd: Annotated[int, Merge.ADD] = 0


@node
def fan_out(n: int) -> NextAll[int]:
    """One item per number from 1 to n."""
    return NextAll(list(range(1, n + 1)))


@node
def square(ctx: NodeContext, x: int) -> int:
    """Square one number."""
    if x % 2:
        ctx.add("odd", 1)
    return x * x


@node(join=True)
def total(squares: list[int]) -> dict[str, object]:
    """Sum every square, once, in index order."""
    return {"squares": squares, "sum": sum(squares)}


workflow = Workflow("fan_out_join", start=fan_out, context=Counts)
workflow.edge(fan_out, square).edge(square, total)


async def main() -> None:
    runner = LocalRunner(workflow)
    result = await runner.run(10)
    print(f"squares: {result['squares']}")
    print(f"sum: {result['sum']}")
    print(f"odd branches: {runner.context['odd']}")
    print(f"empty fan-out: {await workflow.run(0)}")


if __name__ == "__main__":
    asyncio.run(main())
